"""Issue 18's config-space sweep for the ORIGINAL real-stanford/diffusion_policy code: one small checkpoint per
config field of its U-Net policies (DiffusionUnetLowdimPolicy, DiffusionUnetHybridImagePolicy) that changes the
weights or the sampling, each with a non-default legal value, made by the original's own code.

Runs only when asked (never from the tests), with the python of a throwaway venv that has what the original
imports, and the original's python folders from a git archive of its commit 5ba07ac (the `fetch` tool's mirror):

    git -C <mirror of real-stanford/diffusion_policy> archive 5ba07ac diffusion_policy/{config,common,model,\
policy,workspace,dataset,codecs,shared_memory,env_runner,gym_util} | tar -x -C /tmp/orig
    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/orig_venv     # + torch 2.11, torchvision, diffusers,
    /tmp/orig_venv/bin/pip install hydra-core omegaconf dill six zarr einops  # (here: a .pth to /tmp/lr/v's)
    /tmp/orig_venv/bin/pip install --no-deps robomimic==0.2.0
    OMP_NUM_THREADS=1 /tmp/orig_venv/bin/python tests/peers_sweep/make_original_sweep.py --orig /tmp/orig \
        --zarr ../shared/data/pusht/pusht_cchi_v7_replay.zarr.zip --out /tmp/orig_sweep
    # then: cp /tmp/orig_sweep/original_sweep_manifest.json /tmp/orig_sweep/original_sweep.tar.xz tests/peers_sweep/

For each VARIANT below it composes the original's hydra workspace config (a tiny base plus the variant's
overrides), builds the original's workspace (TrainDiffusionUnetLowdimWorkspace / ...HybridWorkspace: seed 42,
hydra.utils.instantiate(cfg.policy)), sets the normalizer the original's own dataset class fits on the REAL
PushT replay, makes the weights small (see `shrink`), saves with the workspace's own save_checkpoint, reloads as
the original's eval.py does and records, on real frames, every torch.randn the original's predict_action draws
(the initial trajectory, DDPM's per-step noise), the normalized trajectory its conditional_sample returns and
the executed actions, for the config's own sampler and the other kind (DDIM-10 beside DDPM, DDPM-T beside
DDIM), and the original's own float64 run of the same policy and draws (reference.npz, the keys
dpkit.convert.check.read_reference reads). Every fixture folder (latest.ckpt + reference.npz) goes into one
solid xz tar; original_sweep_manifest.json lists per fixture: field, value, the hydra overrides, the expected
outcome in dpkit-convert (exact / refused and the name the refusal line holds) and what was measured.
Nothing of the original is copied here: this script imports it from --orig.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import lzma
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ORIGINAL_COMMIT = "5ba07ac6661db573af695b419a7947ecb704690f"
NOISE_SEED = 0               # torch.manual_seed before each predict_action (the original draws on the global RNG)
REF_EPISODES = (23, 141)     # reference observations: frames FRAME .. FRAME + n_obs_steps - 1 of these episodes
FRAME = 30
BN_EPISODES = (11, 40, 77, 101)  # frames whose train-mode passes set the BatchNorm variant's running statistics
KEEP = 0.005                 # fraction of each ResNet conv weight kept non-zero (the file must compress)
MANTISSA_MASK = -(1 << 19)   # float32 bits kept: sign, exponent, 4 mantissa bits (0xFFF80000)
LOWDIM_WS, DDIM_WS, HYBRID_WS = ("train_diffusion_unet_lowdim_workspace", "train_diffusion_unet_ddim_lowdim_workspace",
                                 "train_diffusion_unet_hybrid_workspace")
COMMON = ["training.device=cpu", "logging.mode=offline"]
# The two bases (tiny U-Nets); every variant is one of them plus its own overrides.
BASE = {
    "lowdim": dict(workspace=LOWDIM_WS, overrides=COMMON + [
        "task=pusht_lowdim", "policy.model.down_dims=[8,16]", "policy.model.diffusion_step_embed_dim=16"]),
    # the image base: no EMA copy (the checkpoint then holds the ResNet-18 once; the converter reads `model`)
    "img": dict(workspace=HYBRID_WS, overrides=COMMON + [
        "task=pusht_image", "policy.down_dims=[8,16]", "policy.diffusion_step_embed_dim=16",
        "policy.crop_shape=[84,84]", "training.use_ema=false"]),
}
EXACT, REFUSED = "exact", "refused"


def V(name, base, field, value, expect, overrides=(), workspace=None, note="", refuse_word=None, kind="sampling",
      cfg_path=None):
    """One fixture: BASE[base] with `overrides` (hydra syntax); `expect` exact or refused (the converter's one
    line names `refuse_word`, default the field's last part); cfg_path: where the saved cfg holds the value."""
    return {"name": name, "base": base, "field": field, "value": value, "expect": expect,
            "overrides": list(overrides), "workspace": workspace or BASE[base]["workspace"], "note": note,
            "refuse_word": refuse_word or field.rsplit(".", 1)[-1], "kind": kind, "cfg_path": cfg_path or field}


S = "policy.noise_scheduler."
VARIANTS = [
    V("lowdim_base", "lowdim", "(base)", None, EXACT, kind="base", cfg_path="",
      note="train_diffusion_unet_lowdim_workspace, task pusht_lowdim (obs_as_global_cond true), tiny U-Net "
           "(down_dims [8, 16], diffusion_step_embed_dim 16); everything else the workspace's"),
    # --- weights / shapes -------------------------------------------------------------------------------------
    V("n_obs_steps_1", "lowdim", "n_obs_steps", 1, EXACT, ["n_obs_steps=1"], kind="weights",
      cfg_path="policy.n_obs_steps"),
    V("n_obs_steps_3", "lowdim", "n_obs_steps", 3, EXACT, ["n_obs_steps=3"], kind="weights",
      cfg_path="policy.n_obs_steps"),
    V("horizon_32", "lowdim", "horizon", 32, EXACT, ["horizon=32"], kind="weights", cfg_path="policy.horizon"),
    V("n_action_steps_4", "lowdim", "n_action_steps", 4, EXACT, ["n_action_steps=4"],
      cfg_path="policy.n_action_steps"),
    V("n_action_steps_15", "lowdim", "n_action_steps", 15, EXACT, ["n_action_steps=15"],
      cfg_path="policy.n_action_steps", note="the largest the original executes: horizon - n_obs_steps + 1"),
    V("down_dims_3", "lowdim", "policy.model.down_dims", [8, 16, 32], EXACT, ["policy.model.down_dims=[8,16,32]"],
      kind="weights"),
    V("down_dims_1", "lowdim", "policy.model.down_dims", [16], EXACT, ["policy.model.down_dims=[16]"],
      kind="weights", note="one level: no down- or up-sampling"),
    V("kernel_size_3", "lowdim", "policy.model.kernel_size", 3, EXACT, ["policy.model.kernel_size=3"], kind="weights"),
    V("kernel_size_7", "lowdim", "policy.model.kernel_size", 7, EXACT, ["policy.model.kernel_size=7"], kind="weights"),
    V("n_groups_4", "lowdim", "policy.model.n_groups", 4, EXACT, ["policy.model.n_groups=4"], kind="weights",
      note="the original's final conv block keeps GroupNorm's 8 groups"),
    V("n_groups_16", "lowdim", "policy.model.n_groups", 16, EXACT,
      ["policy.model.n_groups=16", "policy.model.down_dims=[16,32]"], kind="weights",
      note="down_dims [16, 32]: 16 groups need 16 channels"),
    V("diffusion_step_embed_dim_32", "lowdim", "policy.model.diffusion_step_embed_dim", 32, EXACT,
      ["policy.model.diffusion_step_embed_dim=32"], kind="weights"),
    V("cond_predict_scale_false", "lowdim", "policy.model.cond_predict_scale", False, REFUSED,
      ["policy.model.cond_predict_scale=false"], kind="weights",
      note="bias-only FiLM: dpkit's FiLM always predicts scale and bias"),
    V("obs_as_global_cond_false", "lowdim", "obs_as_global_cond", False, REFUSED, ["obs_as_global_cond=false"],
      kind="weights", cfg_path="policy.obs_as_global_cond",
      note="inpainting: the U-Net denoises [action, obs] and the observed steps are written into the trajectory"),
    V("obs_as_local_cond_true", "lowdim", "obs_as_local_cond", True, REFUSED,
      ["obs_as_global_cond=false", "obs_as_local_cond=true"], kind="weights", cfg_path="policy.obs_as_local_cond",
      refuse_word="local_cond", note="local conditioning (a second U-Net branch per time step)"),
    V("pred_action_steps_only_true", "lowdim", "pred_action_steps_only", True, REFUSED,
      ["pred_action_steps_only=true"], kind="sampling", cfg_path="policy.pred_action_steps_only",
      note="the U-Net denoises only the n_action_steps executed steps"),
    V("oa_step_convention_false", "lowdim", "policy.oa_step_convention", False, REFUSED,
      ["policy.oa_step_convention=false"], note="the executed slice starts at n_obs_steps, not n_obs_steps - 1"),
    V("n_latency_steps_1", "lowdim", "n_latency_steps", 1, REFUSED, ["n_latency_steps=1"], cfg_path="n_latency_steps",
      note="the policy predicts n_action_steps + 1 steps and the runner drops the first"),
    # --- the noise schedule and sampling -------------------------------------------------------------------------
    V("num_inference_steps_30", "lowdim", "policy.num_inference_steps", 30, EXACT, ["policy.num_inference_steps=30"],
      note="DDPM with 30 of 100 steps (diffusers' leading spacing, 3 apart)"),
    V("ddim_workspace", "lowdim", "policy.noise_scheduler._target_", "DDIMScheduler", EXACT,
      ["obs_as_global_cond=true", "policy.model.down_dims=[8,16]", "policy.model.diffusion_step_embed_dim=16"],
      workspace=DDIM_WS,
      note="train_diffusion_unet_ddim_lowdim_workspace (DDIMScheduler, num_inference_steps 8: 12 apart) with "
           "obs_as_global_cond true"),
    V("num_train_timesteps_50", "lowdim", S + "num_train_timesteps", 50, EXACT,
      [S + "num_train_timesteps=50", "policy.num_inference_steps=50"],
      note="num_inference_steps 50 too (the workspace sets 100, which diffusers refuses above 50)"),
    V("beta_schedule_linear", "lowdim", S + "beta_schedule", "linear", EXACT, [S + "beta_schedule=linear"]),
    V("beta_schedule_scaled_linear", "lowdim", S + "beta_schedule", "scaled_linear", EXACT,
      [S + "beta_schedule=scaled_linear"]),
    V("beta_schedule_sigmoid", "lowdim", S + "beta_schedule", "sigmoid", REFUSED, [S + "beta_schedule=sigmoid"],
      note="legal for the original's DDPMScheduler; diffusers' DDIMScheduler lacks it"),
    V("beta_start_linear", "lowdim", S + "beta_start", 0.0005, REFUSED,
      [S + "beta_schedule=linear", S + "beta_start=0.0005"]),
    V("beta_end_linear", "lowdim", S + "beta_end", 0.03, REFUSED, [S + "beta_schedule=linear", S + "beta_end=0.03"]),
    V("beta_start_cosine", "lowdim", S + "beta_start", 0.0005, EXACT, [S + "beta_start=0.0005", S + "beta_end=0.03"],
      note="squaredcos_cap_v2 ignores beta_start / beta_end (diffusers)"),
    V("prediction_type_sample", "lowdim", S + "prediction_type", "sample", EXACT, [S + "prediction_type=sample"]),
    V("clip_sample_false", "lowdim", S + "clip_sample", False, EXACT,
      [S + "clip_sample=false", S + "beta_schedule=linear"],
      note="with the linear schedule: under squaredcos_cap_v2 a random network's unclipped x0 runs away"),
    V("clip_sample_range_1.5", "lowdim", S + "clip_sample_range", 1.5, EXACT, ["+" + S + "clip_sample_range=1.5"],
      note="not in the workspace yaml; a hydra `+` override, passed on to diffusers"),
    V("variance_type_fixed_small_log", "lowdim", S + "variance_type", "fixed_small_log", EXACT,
      [S + "variance_type=fixed_small_log"],
      note="the workspace yaml's comment names it (Yilun's paper); the same variance as fixed_small via exp(log)"),
    V("variance_type_fixed_large", "lowdim", S + "variance_type", "fixed_large", REFUSED,
      [S + "variance_type=fixed_large"]),
    V("timestep_spacing_trailing", "lowdim", S + "timestep_spacing", "trailing", REFUSED,
      ["+" + S + "timestep_spacing=trailing"],
      note="an argument of newer diffusers (the original pins diffusers 0.11, which lacks it): other timesteps"),
    V("ddim_set_alpha_to_one_false", "lowdim", S + "set_alpha_to_one", False, REFUSED,
      ["obs_as_global_cond=true", "policy.model.down_dims=[8,16]", "policy.model.diffusion_step_embed_dim=16",
       S + "set_alpha_to_one=false"], workspace=DDIM_WS),
    V("ddim_steps_offset_1", "lowdim", S + "steps_offset", 1, REFUSED,
      ["obs_as_global_cond=true", "policy.model.down_dims=[8,16]", "policy.model.diffusion_step_embed_dim=16",
       S + "steps_offset=1"], workspace=DDIM_WS),
    V("ddim_eta_1", "lowdim", "policy.eta", 1.0, REFUSED,
      ["obs_as_global_cond=true", "policy.model.down_dims=[8,16]", "policy.model.diffusion_step_embed_dim=16",
       "+policy.eta=1.0"], workspace=DDIM_WS,
      note="an extra policy key goes to the policy's **kwargs and on to every scheduler.step(): DDIM with eta 1 "
           "draws noise at each step"),
    # --- the hybrid image policy ----------------------------------------------------------------------------------
    V("img_base", "img", "(base)", None, EXACT, kind="base", cfg_path="",
      note="train_diffusion_unet_hybrid_workspace, task pusht_image: robomimic ResNet-18 with GroupNorm "
           "(obs_encoder_group_norm true), crop 84, eval_fixed_crop true; tiny U-Net; training.use_ema false"),
    V("obs_encoder_group_norm_false", "img", "policy.obs_encoder_group_norm", False, EXACT,
      ["policy.obs_encoder_group_norm=false"], kind="vision",
      note="robomimic's BatchNorm ResNet-18, running statistics from train-mode passes over real frames"),
    V("crop_shape_76", "img", "policy.crop_shape", [76, 76], EXACT, ["policy.crop_shape=[76,76]"], kind="vision",
      note="the workspace's own default"),
    V("crop_shape_null", "img", "policy.crop_shape", None, EXACT, ["policy.crop_shape=null"], kind="vision"),
    V("img_n_obs_steps_3", "img", "n_obs_steps", 3, EXACT, ["n_obs_steps=3"], kind="weights",
      cfg_path="policy.n_obs_steps", note="three steps of [image feature, agent_pos] in the condition"),
    V("crop_shape_84x76", "img", "policy.crop_shape", [84, 76], REFUSED, ["policy.crop_shape=[84,76]"],
      kind="vision"),
    V("eval_fixed_crop_false", "img", "policy.eval_fixed_crop", False, REFUSED, ["policy.eval_fixed_crop=false"],
      kind="vision", note="robomimic 0.2.0's CropRandomizer takes random crops in eval mode too"),
]


# ---------------------------------------------------------------------------------------------------------------

def setup(orig: str, zarr_path: str):
    """Import the original from `orig` with the stubs and the zarr-3 replay of make_original_hybrid.py."""
    sys.path.insert(0, str(Path(orig).resolve()))
    sys.path.insert(0, str(HERE.parent / "data" / "peers" / "original_pusht_hybrid_tiny"))
    from make_original_hybrid import open_replay, stub_modules

    stub_modules()
    import diffusion_policy.workspace.train_diffusion_unet_hybrid_workspace  # noqa: F401  registers "eval"
    import diffusion_policy.workspace.train_diffusion_unet_lowdim_workspace  # noqa: F401
    from diffusion_policy.common.replay_buffer import ReplayBuffer

    root = open_replay(zarr_path)

    def copy_from_path(cls, zarr_path, keys=None, **kwargs):
        data = {k: (root["data"][k] if k == "img" else np.asarray(root["data"][k][:])) for k in keys}
        return cls(root={"data": data, "meta": {"episode_ends": np.asarray(root["meta"]["episode_ends"][:])}})

    ReplayBuffer.copy_from_path = classmethod(copy_from_path)
    return root


def compose(orig: str, variant: dict):
    import hydra
    from omegaconf import OmegaConf

    overrides = BASE[variant["base"]]["overrides"] + variant["overrides"]
    if variant["workspace"] == DDIM_WS:
        overrides = COMMON + ["task=pusht_lowdim"] + variant["overrides"]
    with hydra.initialize_config_dir(config_dir=str(Path(orig).resolve() / "diffusion_policy" / "config"),
                                     version_base=None):
        cfg = hydra.compose(variant["workspace"], overrides=overrides)
    OmegaConf.resolve(cfg)  # as train.py does
    return cfg, overrides


def workspace_class(cfg):
    import hydra

    return hydra.utils.get_class(cfg._target_)


def round_(t):
    import torch

    return (t.to(torch.bfloat16).to(torch.float32).view(torch.int32) & MANTISSA_MASK).view(torch.float32)


def shrink(ws, base_sd, bn_images):
    """Make the weights compressible, in the original's model (and its EMA copy): every norm affine weight ~
    U(0.5, 1.5) and bias ~ N(0, 0.1); every ResNet conv weight 99.5 % set to +0.0; every float parameter cut to
    bfloat16 and then to 4 mantissa bits; every tensor whose name and shape equal the base's copied from it;
    BatchNorm running statistics from 6 train-mode passes over 8 of 48 real frames."""
    import torch

    model = ws.model
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.Conv2d) and name.startswith("obs_encoder."):
                m.weight.masked_fill_(torch.rand(m.weight.shape, generator=gen) >= KEEP, 0.0)
        for p in model.parameters():
            p.copy_(round_(p))
        shared = 0
        if base_sd is not None:
            for k, v in model.state_dict().items():
                if k in base_sd and base_sd[k].shape == v.shape and base_sd[k].dtype == v.dtype \
                        and not k.endswith(("running_mean", "running_var", "num_batches_tracked")) \
                        and not k.startswith("normalizer."):
                    v.copy_(base_sd[k])
                    shared += 1
    if bn_images is not None and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        rng = np.random.default_rng(7)
        enc = model.obs_encoder
        enc.train()
        with torch.no_grad():
            nimg = model.normalizer["image"].normalize(torch.from_numpy(bn_images))
            for _ in range(6):
                pick = torch.from_numpy(rng.choice(len(bn_images), 8, replace=False))
                enc({"image": nimg[pick], "agent_pos": torch.zeros(8, 2)})
        enc.eval()
    if ws.ema_model is not None:
        ws.ema_model.load_state_dict(model.state_dict())
    return shared


class Draws:
    """Record (or replay) every torch.randn while active: the original's initial trajectory and DDPM's step noise
    (diffusers' randn_tensor calls torch.randn)."""

    def __init__(self, replay=None):
        self.replay = None if replay is None else iter(replay)
        self.drawn = []

    def __enter__(self):
        import torch

        self.real = torch.randn

        def randn(*a, **k):
            if self.replay is not None:
                x = next(self.replay).to(k.get("dtype") or torch.get_default_dtype())
            else:
                x = self.real(*a, **k)
            self.drawn.append(x.clone())
            return x

        torch.randn = randn
        return self

    def __exit__(self, *exc):
        import torch

        torch.randn = self.real


def other_scheduler(sched, kind: str):
    """The other sampler on the same schedule: DDIM beside a DDPM config (as train_diffusion_unet_ddim_*: eta 0,
    set_alpha_to_one, steps_offset 0), DDPM (fixed_small) beside a DDIM one."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    c = sched.config
    common = dict(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                  beta_schedule=c.beta_schedule, clip_sample=c.clip_sample, prediction_type=c.prediction_type,
                  clip_sample_range=c.clip_sample_range)
    if kind == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **common)
    return DDPMScheduler(variance_type="fixed_small", **common)


def sample(policy, sched, k: int, obs: dict, replay=None):
    """(normalized trajectory as conditional_sample returned it, predict_action's result, draws)."""
    import torch

    saved = policy.noise_scheduler, policy.num_inference_steps
    policy.noise_scheduler, policy.num_inference_steps = sched, k
    real = policy.conditional_sample
    out = {}

    def capture(*a, **kw):
        out["traj"] = real(*a, **kw)
        return out["traj"]

    policy.conditional_sample = capture
    try:
        with torch.no_grad(), Draws(replay) as d:
            torch.manual_seed(NOISE_SEED)
            res = policy.predict_action(obs)
    finally:
        del policy.conditional_sample
        policy.noise_scheduler, policy.num_inference_steps = saved
    return out["traj"], res, d.drawn


def make_fixture(orig, variant, out: Path, obs_all: dict, normalizers: dict, base_sd, bn_images) -> dict:
    import dill
    import torch

    cfg, overrides = compose(orig, variant)
    ws_cls = workspace_class(cfg)
    ws = ws_cls(cfg, output_dir=str(out.parent.parent / "_ws"))
    hybrid = variant["base"] == "img"
    normalizer = normalizers[variant["base"]]
    ws.model.set_normalizer(normalizer)
    if ws.ema_model is not None:
        ws.ema_model.set_normalizer(normalizer)
    shared = shrink(ws, base_sd, bn_images if hybrid else None)
    out.mkdir(parents=True)
    ckpt = out / "latest.ckpt"
    ws.save_checkpoint(path=ckpt)
    ws._saving_thread.join()
    rec = {"tensors": len(ws.model.state_dict()), "tensors_shared_with_base": shared,
           "ckpt_bytes": ckpt.stat().st_size, "overrides": overrides}
    sd_out = {k: v.clone() for k, v in ws.model.state_dict().items()}
    if variant["expect"] == REFUSED:
        return rec | {"state_dict": sd_out}

    # the reference: reload as eval.py does (fresh workspace + load_payload), ema_model if use_ema, eval, CPU
    payload = torch.load(open(ckpt, "rb"), pickle_module=dill, weights_only=False)
    ws2 = ws_cls(payload["cfg"], output_dir=str(out.parent.parent / "_ws"))
    ws2.load_payload(payload, exclude_keys=None, include_keys=None)
    policy = ws2.ema_model if payload["cfg"].training.use_ema else ws2.model
    policy.eval()
    To = policy.n_obs_steps
    idx = np.stack([obs_all["starts"][e] + FRAME + np.arange(To) for e in REF_EPISODES])
    ref: dict[str, np.ndarray] = {}
    if hybrid:
        obs_np = {"image": obs_all["images"](idx), "agent_pos": obs_all["agent_pos"][idx]}
        ref["obs_image"], ref["obs_agent_pos"] = obs_np["image"], obs_np["agent_pos"]
    else:
        obs_np = {"obs": obs_all["obs"][idx]}
        ref["obs"] = obs_np["obs"]
    obs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in obs_np.items()}

    sched = policy.noise_scheduler
    own_kind = "ddim" if type(sched).__name__ == "DDIMScheduler" else "ddpm"
    T = sched.config.num_train_timesteps
    cases = {}
    for kind, k, s in ((own_kind, policy.num_inference_steps, sched),
                       (("ddim", 10) if own_kind == "ddpm" else ("ddpm", T)) + (None,)):
        s = s or other_scheduler(sched, kind)
        traj, res, drawn = sample(policy, s, k, obs)
        assert len(drawn) == 1 + (k - 1 if kind == "ddpm" else 0), (kind, k, len(drawn))
        assert len(s.timesteps) == k
        if "initial_noise" in ref:
            assert np.array_equal(ref["initial_noise"], drawn[0].numpy())
        ref["initial_noise"] = drawn[0].numpy()
        tag = f"{kind}{k}"
        ref[f"{tag}_trajectory_normalized"] = traj.numpy()
        ref[f"{tag}_actions"] = res["action"].numpy()
        ref[f"{tag}_action_pred"] = res["action_pred"].numpy()
        ref[f"{tag}_timesteps"] = s.timesteps.numpy().astype(np.int64)
        if kind == "ddpm":
            ref[f"{tag}_step_noise"] = torch.stack(drawn[1:]).numpy()
        # the original's own float64 run: the same policy in float64, the same observations and draws
        # (under float64 as the default dtype: the U-Net's sinusoidal step embedding takes it from torch.arange)
        pol64 = copy.deepcopy(policy).double().eval()
        torch.set_default_dtype(torch.float64)
        try:
            traj64, res64, _ = sample(pol64, copy.deepcopy(s), k, {kk: v.double() for kk, v in obs.items()},
                                      replay=drawn)
        finally:
            torch.set_default_dtype(torch.float32)
        assert traj64.dtype == torch.float64
        ref[f"{tag}_trajectory_normalized_float64"] = traj64.numpy()
        cases[tag] = {"original_float32_vs_float64_normalized": float((traj.double() - traj64).abs().max()),
                      "original_float32_vs_float64_px": float((res["action"].double() - res64["action"]).abs().max()),
                      "trajectory_abs_max_normalized": float(traj64.abs().max())}
    np.savez_compressed(out / "reference.npz", **ref)
    return rec | {"samplers": cases, "default_sampler": f"{own_kind}-{policy.num_inference_steps}",
                  "weights": "ema_model" if payload["cfg"].training.use_ema else "model", "state_dict": sd_out}


def cfg_value(cfg, path: str):
    from omegaconf import OmegaConf

    cur = OmegaConf.to_container(cfg, resolve=True)
    for part in path.split(".") if path else []:
        if not isinstance(cur, dict) or part not in cur:
            return "(absent)"
        cur = cur[part]
    return cur if path else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orig", required=True)
    ap.add_argument("--zarr", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    ap.add_argument("--no-archive", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    root = setup(args.orig, args.zarr)

    import diffusers
    import hydra
    import robomimic
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    # the normalizers the original's own dataset classes fit on the real replay (all 206 episodes)
    normalizers, base_cfg = {}, {}
    for base in ("lowdim", "img"):
        cfg, _ = compose(args.orig, {"base": base, "workspace": BASE[base]["workspace"], "overrides": []})
        base_cfg[base] = cfg
        normalizers[base] = hydra.utils.instantiate(cfg.task.dataset).get_normalizer()
    state = np.asarray(root["data/state"][:], np.float32)
    kp = np.asarray(root["data/keypoint"][:], np.float32)
    ends = np.asarray(root["meta/episode_ends"][:])
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)

    def images(idx):
        flat = np.asarray(idx).reshape(-1)
        img = np.stack([np.asarray(root["data/img"][int(i)]) for i in flat])  # as PushTImageDataset: / 255, CHW
        return (np.moveaxis(img, -1, 1) / 255).astype(np.float32).reshape(*np.asarray(idx).shape, 3, 96, 96)

    # PushTLowdimDataset's obs: the 9 keypoints flattened, then agent x, y
    obs_all = {"starts": starts, "images": images, "agent_pos": state[:, :2],
               "obs": np.concatenate([kp.reshape(len(kp), -1), state[:, :2]], -1).astype(np.float32)}
    bn_idx = np.concatenate([starts[e] + np.arange(10, 22) for e in BN_EPISODES])
    bn_images = images(bn_idx)

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "robomimic": robomimic.__version__,
                "hydra": hydra.__version__, "numpy": np.__version__}
    manifest = {"peer": "real-stanford/diffusion_policy", "original_commit": ORIGINAL_COMMIT, "versions": versions,
                "made_by": "tests/peers_sweep/make_original_sweep.py", "archive": "original_sweep.tar.xz",
                "base": {k: v["overrides"] for k, v in BASE.items()}, "fixtures": []}
    base_sd: dict[str, dict] = {}
    names = set(args.only or [v["name"] for v in VARIANTS])
    for variant in VARIANTS:
        if variant["name"] not in names:
            continue
        t1 = time.time()
        rec = make_fixture(args.orig, variant, out / "fixtures" / variant["name"], obs_all, normalizers,
                           base_sd.get(variant["base"]), bn_images)
        sd = rec.pop("state_dict")
        if variant["kind"] == "base":
            base_sd[variant["base"]] = sd
        saved = torch.load(out / "fixtures" / variant["name"] / "latest.ckpt", pickle_module=__import__("dill"),
                           weights_only=False)["cfg"]
        entry = {k: variant[k] for k in ("name", "base", "field", "value", "kind", "note", "workspace")}
        entry.update({"overrides": rec.pop("overrides"),
                      "expected": {"outcome": variant["expect"]} | (
                          {"refusal_names": variant["refuse_word"]} if variant["expect"] == REFUSED else {}),
                      "cfg_value_check": {variant["cfg_path"]: cfg_value(saved, variant["cfg_path"])}
                      if variant["cfg_path"] else {},
                      "made": rec, "seconds": round(time.time() - t1, 1)})
        manifest["fixtures"].append(entry)
        print(variant["name"], json.dumps(rec.get("samplers", ""))[:400], flush=True)

    if args.no_archive:
        (out / "original_sweep_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted((out / "fixtures").rglob("*")):
            if path.is_file():
                info = tarfile.TarInfo(str(path.relative_to(out / "fixtures")))
                info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 1, "lp": 2, "pb": 2,
                "dict_size": 192 << 20}]
    (out / manifest["archive"]).write_bytes(lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, filters=filters))
    manifest["archive_bytes"] = (out / manifest["archive"]).stat().st_size
    manifest["archive_uncompressed_bytes"] = len(buf.getvalue())
    manifest["seconds"] = round(time.time() - t0, 1)
    (out / "original_sweep_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({k: manifest[k] for k in ("archive_bytes", "archive_uncompressed_bytes", "seconds")}))


if __name__ == "__main__":
    main()
