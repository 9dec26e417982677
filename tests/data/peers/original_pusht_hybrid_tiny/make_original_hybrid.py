"""Make the original_pusht_hybrid_tiny fixture with the ORIGINAL real-stanford/diffusion_policy code.

Runs only when asked (never from the tests), in a throwaway venv that has what the original imports:

    python make_original_hybrid.py --orig /tmp/orig --zarr ../shared/data/pusht/pusht_cchi_v7_replay.zarr.zip \
        --out /tmp/hybrid_fixture

--orig is a folder holding the original's `diffusion_policy/` package (a git archive of its repository);
--zarr the PushT replay (zip or folder); --out receives latest.ckpt.xz, reference.npz and facts.json.
README.txt beside this file says what the venv held and what each step does. Nothing of the original
is copied here: this script imports it from --orig.
"""

from __future__ import annotations

import argparse
import copy
import json
import lzma
import random
import sys
import types
from pathlib import Path

import numpy as np

KEEP = 0.02        # fraction of each ResNet conv's input channels kept per output channel
EPISODES = (0, 50, 150)  # reference observations: the first 2 frames of these episodes


def stub_modules() -> None:
    """Modules the original imports but never uses on this path (logging, a jit, a json-log reader)."""
    import typing

    import diffusers.optimization as opt  # before the stubs: diffusers probes for an installed wandb
    import torch

    wandb = types.ModuleType("wandb")
    wandb.init = lambda *a, **k: types.SimpleNamespace(log=lambda *a, **k: None)
    sys.modules["wandb"] = wandb
    pandas = types.ModuleType("pandas")
    pandas.DataFrame = object  # named in an annotation of json_logger.read_json_log only
    sys.modules["pandas"] = pandas
    numba = types.ModuleType("numba")
    numba.jit = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
    sys.modules["numba"] = numba
    # the original's lr_scheduler.py imports these names from diffusers.optimization (older diffusers had them)
    opt.Union, opt.Optional, opt.Optimizer = typing.Union, typing.Optional, torch.optim.Optimizer


def open_replay(path: str):
    import zarr

    if path.endswith(".zip"):
        return zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    return zarr.open_group(path, mode="r")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orig", required=True)
    ap.add_argument("--zarr", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(args.orig).resolve()))
    stub_modules()

    import dill
    import hydra
    import torch
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from omegaconf import OmegaConf

    import diffusion_policy.workspace.train_diffusion_unet_hybrid_workspace as wsmod  # registers "eval"
    from diffusion_policy.common.pytorch_util import dict_apply
    from diffusion_policy.common.replay_buffer import ReplayBuffer

    # The original reads the replay with zarr 2; here the same arrays come from zarr 3 (images lazily).
    root = open_replay(args.zarr)

    def copy_from_path(cls, zarr_path, keys=None, **kwargs):
        data = {k: (root["data"][k] if k == "img" else np.asarray(root["data"][k][:])) for k in keys}
        return cls(root={"data": data, "meta": {"episode_ends": np.asarray(root["meta"]["episode_ends"][:])}})

    ReplayBuffer.copy_from_path = classmethod(copy_from_path)

    config_dir = str(Path(args.orig).resolve() / "diffusion_policy" / "config")
    overrides = ["task=pusht_image", "policy.crop_shape=[84,84]", "policy.down_dims=[16,32,64]",
                 "policy.diffusion_step_embed_dim=16", "training.device=cpu", "logging.mode=offline"]
    with hydra.initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = hydra.compose("train_diffusion_unet_hybrid_workspace", overrides=overrides)
    OmegaConf.resolve(cfg)  # as train.py does before instantiating the workspace

    ws = wsmod.TrainDiffusionUnetHybridWorkspace(cfg, output_dir=str(out / "_ws"))
    # --- the start of workspace.run(): dataset, normalizer fitted on it, set on model and ema_model ---
    # (no training step: the EMA copy stays equal to the model, so the committed file holds the weights
    # once after compression, and the optimizer has no state yet)
    dataset = hydra.utils.instantiate(cfg.task.dataset)
    normalizer = dataset.get_normalizer()
    ws.model.set_normalizer(normalizer)
    ws.ema_model.set_normalizer(normalizer)

    # --- keep the committed file small: sparse ResNet conv weights (the same zeros in both copies) ---
    # Each output channel keeps the taps of one random contiguous window of KEEP of its input channels
    # (at least one); the rest is set to 0. Contiguous runs compress to about their raw size, every output
    # channel stays alive and sees different inputs, so a misplaced tensor or channel still shows.
    gen = torch.Generator().manual_seed(7)
    conv_names = []
    with torch.no_grad():
        ema_mods = dict(ws.ema_model.obs_encoder.named_modules())
        for name, mod in ws.model.obs_encoder.named_modules():
            if isinstance(mod, torch.nn.Conv2d) and ".backbone." in f".{name}.":
                out_c, in_c = mod.weight.shape[:2]
                width = max(1, round(in_c * KEEP))
                start = torch.randint(0, in_c - width + 1, (out_c, 1), generator=gen)
                cols = torch.arange(in_c)[None, :]
                keep = ((cols >= start) & (cols < start + width))[:, :, None, None]
                for m in (mod, ema_mods[name]):  # +0.0, not w * 0 (= -0.0 for negative w: 1 bit each)
                    m.weight.copy_(torch.where(keep, m.weight, torch.zeros(())))
                conv_names.append(name)

    ckpt = out / "latest.ckpt"
    ws.save_checkpoint(path=ckpt)
    ws._saving_thread.join()
    raw = ckpt.read_bytes()
    with lzma.open(out / "latest.ckpt.xz", "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(raw)

    # --- the reference: reload as eval.py does (fresh workspace + load_payload), ema_model, eval ----
    payload = torch.load(open(ckpt, "rb"), pickle_module=dill, weights_only=False)
    ws2 = wsmod.TrainDiffusionUnetHybridWorkspace(payload["cfg"], output_dir=str(out / "_ws"))
    ws2.load_payload(payload, exclude_keys=None, include_keys=None)
    policy = ws2.ema_model if payload["cfg"].training.use_ema else ws2.model
    policy.eval()

    ends = np.asarray(root["meta"]["episode_ends"][:])
    starts = np.concatenate([[0], ends[:-1]])
    idx = [int(starts[e]) + np.arange(2) for e in EPISODES]
    img = np.stack([np.asarray(root["data"]["img"][i[0]:i[0] + 2]) for i in idx])  # (B, 2, 96, 96, 3) 0..255
    state = np.stack([np.asarray(root["data"]["state"][i[0]:i[0] + 2]) for i in idx])
    obs_image = (np.moveaxis(img, -1, 2) / 255).astype(np.float32)  # as PushTImageDataset._sample_to_data
    obs_agent_pos = state[..., :2].astype(np.float32)
    obs = {"image": torch.from_numpy(obs_image), "agent_pos": torch.from_numpy(obs_agent_pos)}
    B, H, A = obs_image.shape[0], policy.horizon, policy.action_dim

    ref: dict[str, np.ndarray] = {"obs_image": obs_image, "obs_agent_pos": obs_agent_pos}
    with torch.no_grad():
        nobs = policy.normalizer.normalize(obs)
        this = dict_apply(nobs, lambda x: x[:, :policy.n_obs_steps].reshape(-1, *x.shape[2:]))
        ref["global_cond"] = policy.obs_encoder(this).reshape(B, -1).numpy()

        # DDPM-100 (the workspace's scheduler), recording every torch.randn the sampler draws
        drawn = []
        real_randn = torch.randn

        def recording_randn(*a, **k):
            x = real_randn(*a, **k)
            drawn.append(x.clone())
            return x

        torch.manual_seed(0)
        torch.randn = recording_randn
        try:
            res = policy.predict_action(obs)
        finally:
            torch.randn = real_randn
        torch.manual_seed(0)
        replay = [torch.randn(B, H, A) for _ in range(100)]
        assert len(drawn) == 100 and all(torch.equal(a, b) for a, b in zip(drawn, replay)), len(drawn)
        ref["ddpm_initial_noise"] = replay[0].numpy()
        ref["ddpm_step_noise"] = torch.stack(replay[1:]).numpy()  # [i] used at t = 99 - i
        ref["ddpm_action"], ref["ddpm_action_pred"] = res["action"].numpy(), res["action_pred"].numpy()
        ref["ddpm_normalized_trajectory"] = policy.normalizer["action"].normalize(res["action_pred"]).numpy()

        # DDIM-10 with the scheduler of train_diffusion_unet_ddim_hybrid_workspace.yaml
        ddim = copy.deepcopy(policy)
        ddim.noise_scheduler = DDIMScheduler(num_train_timesteps=100, beta_start=0.0001, beta_end=0.02,
                                             beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                             set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")
        ddim.num_inference_steps = 10
        torch.manual_seed(0)
        res = ddim.predict_action(obs)
        torch.manual_seed(0)
        ref["ddim10_initial_noise"] = torch.randn(B, H, A).numpy()
        ref["ddim10_timesteps"] = ddim.noise_scheduler.timesteps.numpy()
        ref["ddim10_action"], ref["ddim10_action_pred"] = res["action"].numpy(), res["action_pred"].numpy()
        ref["ddim10_normalized_trajectory"] = policy.normalizer["action"].normalize(res["action_pred"]).numpy()

    sd = payload["state_dicts"]["ema_model"]
    for key in ("agent_pos", "action", "image"):
        for stat in ("scale", "offset"):
            ref[f"normalizer_{key}_{stat}"] = sd[f"normalizer.params_dict.{key}.{stat}"].numpy()
    np.savez_compressed(out / "reference.npz", **ref)

    facts = {"global_step": ws.global_step, "sparse_convs": conv_names, "keep": KEEP,
             "ckpt_bytes": len(raw), "ckpt_xz_bytes": (out / "latest.ckpt.xz").stat().st_size,
             "state_dict_tensors": {k: list(v.shape) for k, v in sd.items()},
             "ema_equals_model": all(torch.equal(sd[k], payload["state_dicts"]["model"][k]) for k in sd),
             "cfg_policy": OmegaConf.to_container(payload["cfg"].policy),
             "versions": {m: __import__(m).__version__ for m in ("torch", "torchvision", "diffusers", "robomimic",
                                                                  "hydra", "omegaconf", "dill", "numpy", "zarr")}}
    (out / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps({k: v for k, v in facts.items() if k not in ("state_dict_tensors", "cfg_policy")}, indent=1))


if __name__ == "__main__":
    random.seed(0)
    main()
