"""Issue 18's config-space sweep: one small fixture per lerobot 0.6.1 DiffusionConfig field that changes the
weights or the sampling, each made by lerobot's own code with a non-default legal value.

Runs only when asked (never from the tests), with the python of a throwaway venv that has lerobot:

    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lr/v
    /tmp/lr/v/bin/pip install "lerobot[diffusion]==0.6.1" zarr
    /tmp/lr/v/bin/python tests/peers_sweep/make_lerobot_sweep.py \
        --zarr ../shared/data/pusht/pusht_cchi_v7_replay.zarr.zip --out /tmp/sweep
    # then: cp /tmp/sweep/manifest.json /tmp/sweep/lerobot061_sweep.tar.xz tests/peers_sweep/

For each VARIANT below it builds lerobot's DiffusionConfig (a tiny base plus the variant's fields), a
DiffusionPolicy (random init, made small: see `make_policy`), lerobot's pre/post processors from the REAL
PushT statistics, saves all three with lerobot's save_pretrained, reads them back and records, on real
frames, with injected initial noise and DDPM's recorded per-step draws: lerobot's DDPM and DDIM trajectories
and executed actions in float32, and lerobot's own float64 run of the same network and draws
(reference.npz, the keys dpkit.convert.check.read_reference reads). Every fixture folder goes into one solid
xz tar (fixtures share most tensors, so xz stores them once); manifest.json lists per fixture: field, value,
lerobot version, the expected outcome in dpkit-convert (exact / refused and why) and what the script
measured. Nothing of lerobot is copied here: this script imports it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import lzma
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

INIT_SEED = 7
NOISE_SEED = 2024            # torch.Generator seed of the injected initial noise
STEP_SEED = 0                # torch.manual_seed before DDPM sampling (diffusers draws on the global RNG)
REF_EPISODES = (23, 141)     # reference observations: frames FRAME.. of these episodes
FRAME = 30
BN_EPISODES = (11, 40, 77, 101)  # frames whose train-mode passes set the BatchNorm variant's running statistics
KEEP = 0.005                 # fraction of each ResNet conv weight kept non-zero (the file must compress)
MANTISSA_MASK = -(1 << 19)   # float32 bits kept: sign, exponent, 4 mantissa bits (0xFFF80000)
N_ENV_POINTS = 8             # environment_state: the dataset's first 8 T-block keypoints (16 values)
IMAGE_STRIDE = 25            # image statistics: every 25th frame of the dataset

# The two base configs (tiny U-Nets). Every variant is one of them plus its own fields.
BASE = {
    "kp": dict(  # PushT keypoints: observation.state [2] + observation.environment_state [16]
        features={"observation.state": ("STATE", (2,)), "observation.environment_state": ("ENV", (16,))},
        normalization_mapping={"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ENV": "MIN_MAX", "ACTION": "MIN_MAX"},
        down_dims=(8, 16), diffusion_step_embed_dim=16, horizon=16, n_action_steps=8),
    "img": dict(  # PushT image: observation.image [3, 96, 96] + observation.state [2]
        features={"observation.image": ("VISUAL", (3, 96, 96)), "observation.state": ("STATE", (2,))},
        normalization_mapping={"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"},
        down_dims=(8, 16), diffusion_step_embed_dim=16, horizon=16, n_action_steps=8,
        crop_shape=(84, 84), use_group_norm=True, pretrained_backbone_weights=None, spatial_softmax_num_keypoints=16),
}

EXACT, REFUSED = "exact", "refused"
STATISTICS_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")  # lerobot <= 0.3


def V(name, base, field, value, expect, fields=None, note="", refuse_word=None, weights=True, kind="sampling"):
    """One fixture: `fields` (default {field: value}) over BASE[base]; `expect` exact or refused (the converter's
    one line names `refuse_word`, default the field); kind: weights / sampling / training-only / features."""
    return {"name": name, "base": base, "field": field, "value": value, "expect": expect,
            "fields": fields if fields is not None else {field: value}, "note": note,
            "refuse_word": refuse_word or field, "store_weights": weights, "kind": kind}


VARIANTS = [
    V("kp_base", "kp", "(base)", None, EXACT, fields={}, kind="base",
      note="the keypoint base itself: lerobot's defaults except the tiny U-Net (down_dims [8, 16], "
           "diffusion_step_embed_dim 16, horizon 16, n_action_steps 8) and an ENV MIN_MAX entry"),
    # --- weights / shapes -------------------------------------------------------------------------------
    V("n_obs_steps_1", "kp", "n_obs_steps", 1, EXACT, kind="weights"),
    V("n_obs_steps_3", "kp", "n_obs_steps", 3, EXACT, kind="weights"),
    V("horizon_32", "kp", "horizon", 32, EXACT, kind="weights"),
    V("n_action_steps_4", "kp", "n_action_steps", 4, EXACT, kind="sampling"),
    V("n_action_steps_15", "kp", "n_action_steps", 15, EXACT, kind="sampling",
      note="the largest legal value, horizon - n_obs_steps + 1"),
    V("down_dims_3", "kp", "down_dims", [8, 16, 32], EXACT, kind="weights"),
    V("down_dims_4", "kp", "down_dims", [8, 8, 16, 16], EXACT, kind="weights"),
    V("kernel_size_3", "kp", "kernel_size", 3, EXACT, kind="weights"),
    V("kernel_size_7", "kp", "kernel_size", 7, EXACT, kind="weights"),
    V("n_groups_4", "kp", "n_groups", 4, EXACT, kind="weights",
      note="lerobot's final conv block keeps 8 groups"),
    V("n_groups_16", "kp", "n_groups", 16, EXACT, fields={"n_groups": 16, "down_dims": [16, 32]}, kind="weights",
      note="down_dims [16, 32]: 16 groups need 16 channels"),
    V("diffusion_step_embed_dim_32", "kp", "diffusion_step_embed_dim", 32, EXACT, kind="weights"),
    V("use_film_scale_modulation_false", "kp", "use_film_scale_modulation", False, REFUSED, kind="weights",
      note="bias-only FiLM: dpkit's FiLM always predicts scale and bias"),
    # --- the noise schedule and sampling ---------------------------------------------------------------------
    V("noise_scheduler_type_ddim", "kp", "noise_scheduler_type", "DDIM", EXACT,
      fields={"noise_scheduler_type": "DDIM", "num_inference_steps": 10}),
    V("num_train_timesteps_50", "kp", "num_train_timesteps", 50, EXACT),
    V("beta_schedule_linear", "kp", "beta_schedule", "linear", EXACT),
    V("beta_schedule_scaled_linear", "kp", "beta_schedule", "scaled_linear", EXACT),
    V("beta_schedule_sigmoid", "kp", "beta_schedule", "sigmoid", REFUSED,
      note="legal for lerobot's DDPM (diffusers' DDPMScheduler has it; its DDIMScheduler does not)"),
    V("beta_start_linear", "kp", "beta_start", 0.0005, REFUSED,
      fields={"beta_schedule": "linear", "beta_start": 0.0005}),
    V("beta_end_linear", "kp", "beta_end", 0.03, REFUSED, fields={"beta_schedule": "linear", "beta_end": 0.03}),
    V("beta_start_cosine", "kp", "beta_start", 0.0005, EXACT, fields={"beta_start": 0.0005, "beta_end": 0.03},
      note="squaredcos_cap_v2 ignores beta_start / beta_end (diffusers)"),
    V("prediction_type_sample", "kp", "prediction_type", "sample", EXACT),
    V("clip_sample_false", "kp", "clip_sample", False, EXACT,
      fields={"clip_sample": False, "beta_schedule": "linear"},
      note="with the linear schedule: under squaredcos_cap_v2 a random network's unclipped x0 runs away "
           "(hundreds, normalized) and float32 alone is then > 1e-3 px"),
    V("clip_sample_range_1.5", "kp", "clip_sample_range", 1.5, EXACT),
    V("clip_sample_range_0.5", "kp", "clip_sample_range", 0.5, EXACT),
    V("num_inference_steps_ddpm_30", "kp", "num_inference_steps", 30, EXACT,
      note="DDPM with 30 of 100 steps (leading spacing, 100 // 30 = 3 apart)"),
    V("num_inference_steps_ddim_7", "kp", "num_inference_steps", 7, EXACT,
      fields={"noise_scheduler_type": "DDIM", "num_inference_steps": 7}),
    # --- training only (no effect on the weights' meaning or on sampling) ---------------------------------
    V("do_mask_loss_for_padding_true", "kp", "do_mask_loss_for_padding", True, EXACT, kind="training-only"),
    V("gradient_checkpointing_true", "kp", "gradient_checkpointing", True, EXACT, kind="training-only"),
    V("compile_model_true", "kp", "compile_model", True, EXACT, kind="inference-only",
      note="torch.compile of the U-Net: lerobot saves its tensors as diffusion.unet._orig_mod.*; the references "
           "are lerobot's eager run of the same module (unwrapped), the compiled one computes the same function"),
    V("drop_n_last_frames_0", "kp", "drop_n_last_frames", 0, EXACT, kind="training-only"),
    # --- normalization ----------------------------------------------------------------------------------------
    V("normalization_state_mean_std", "kp", "normalization_mapping.STATE", "MEAN_STD", EXACT,
      fields={"normalization_mapping": {"STATE": "MEAN_STD"}}, kind="normalization"),
    V("normalization_action_mean_std", "kp", "normalization_mapping.ACTION", "MEAN_STD", EXACT,
      fields={"normalization_mapping": {"ACTION": "MEAN_STD"}}, kind="normalization"),
    V("normalization_env_identity", "kp", "normalization_mapping.ENV", "IDENTITY", EXACT,
      fields={"normalization_mapping": {"ENV": "IDENTITY"}}, kind="normalization"),
    V("normalization_state_identity", "kp", "normalization_mapping.STATE", "IDENTITY", EXACT,
      fields={"normalization_mapping": {"STATE": "IDENTITY"}}, kind="normalization"),
    V("normalization_action_quantiles", "kp", "normalization_mapping.ACTION", "QUANTILES", REFUSED,
      fields={"normalization_mapping": {"ACTION": "QUANTILES"}}, kind="normalization"),
    # --- observation features -----------------------------------------------------------------------------------
    V("features_full_state_5", "kp", "input_features.observation.state.shape", [5], EXACT,
      fields={"features": {"observation.state": ("STATE", (5,))}}, kind="features",
      note="the dataset's whole state (agent x, y, block x, y, angle)"),
    V("features_env_state_18", "kp", "input_features.observation.environment_state.shape", [18], EXACT,
      fields={"features": {"observation.environment_state": ("ENV", (18,))}}, kind="features",
      note="all 9 dataset keypoints"),
    # --- image policies -------------------------------------------------------------------------------------
    V("img_base", "img", "use_group_norm", True, EXACT, fields={}, kind="base",
      note="the image base: GroupNorm ResNet-18 (lerobot's default is BatchNorm), crop 84, one encoder per "
           "camera, 16 keypoints; pretrained_backbone_weights null"),
    V("use_group_norm_false", "img", "use_group_norm", False, EXACT, kind="vision",
      note="BatchNorm ResNet-18, running statistics from train-mode passes over real frames"),
    V("crop_shape_null", "img", "crop_shape", None, EXACT, kind="vision"),
    V("crop_shape_80", "img", "crop_shape", [80, 80], EXACT, kind="vision"),
    V("crop_shape_84x76", "img", "crop_shape", [84, 76], REFUSED, kind="vision", weights=False),
    V("spatial_softmax_num_keypoints_8", "img", "spatial_softmax_num_keypoints", 8, EXACT, kind="vision"),
    V("use_separate_rgb_encoder_per_camera_false", "img", "use_separate_rgb_encoder_per_camera", False, EXACT,
      kind="vision"),
    V("crop_is_random_false", "img", "crop_is_random", False, EXACT, kind="training-only"),
    V("crop_ratio_0.9", "img", "crop_ratio", 0.9, EXACT, kind="vision",
      note="without resize_shape lerobot ignores crop_ratio"),
    V("resize_shape_88", "img", "resize_shape", [88, 88], REFUSED, kind="vision", weights=False),
    V("vision_backbone_resnet34", "img", "vision_backbone", "resnet34", REFUSED, kind="vision", weights=False),
    V("normalization_visual_identity", "img", "normalization_mapping.VISUAL", "IDENTITY", EXACT,
      fields={"normalization_mapping": {"VISUAL": "IDENTITY"}}, kind="normalization"),
    V("normalization_visual_min_max", "img", "normalization_mapping.VISUAL", "MIN_MAX", REFUSED,
      fields={"normalization_mapping": {"VISUAL": "MIN_MAX"}}, kind="normalization"),
    V("features_image_and_env_state", "img", "input_features (image + environment_state)", "ENV [16]", EXACT,
      fields={"features": {"observation.environment_state": ("ENV", (16,))},
              "normalization_mapping": {"ENV": "MIN_MAX"}}, kind="features"),
    V("features_two_cameras", "img", "input_features (cameras)", 2, REFUSED,
      fields={"features": {"observation.image2": ("VISUAL", (3, 96, 96))}}, kind="features", weights=False),
    V("features_image_84", "img", "input_features.observation.image.shape", [3, 84, 84], REFUSED,
      fields={"features": {"observation.image": ("VISUAL", (3, 84, 84))}, "crop_shape": (76, 76)},
      kind="features", weights=False),
]


# ---------------------------------------------------------------------------------------------------------------

def open_replay(path: str):
    import zarr

    if path.endswith(".zip"):
        return zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    return zarr.open_group(path, mode="r")


class Data:
    """PushT as lerobot features: vectors for every step, images for the frames asked for."""

    def __init__(self, path: str):
        self.root = root = open_replay(path)
        state = np.asarray(root["data/state"][:], np.float32)
        kp = np.asarray(root["data/keypoint"][:], np.float32)
        self.vec = {"observation.state": state[:, :2], "state5": state,
                    "observation.environment_state": kp[:, :N_ENV_POINTS].reshape(len(kp), -1),
                    "env18": kp.reshape(len(kp), -1), "action": np.asarray(root["data/action"][:], np.float32)}
        ends = np.asarray(root["meta/episode_ends"][:])
        self.starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)

    def images(self, idx: np.ndarray) -> np.ndarray:
        """(…, 3, 96, 96) float32 in [0, 1] for frame indices idx (any shape)."""
        flat = np.asarray(idx).reshape(-1)
        img = np.stack([np.asarray(self.root["data/img"][int(i)], np.float32) for i in flat]) / 255.0
        return img.transpose(0, 3, 1, 2).reshape(*np.asarray(idx).shape, 3, 96, 96).astype(np.float32)

    def image_stats(self) -> dict[str, np.ndarray]:
        img = np.asarray(self.root["data/img"][::IMAGE_STRIDE], np.float64) / 255.0  # (N, 96, 96, 3)
        flat = img.reshape(-1, 3)
        return {"mean": flat.mean(0), "std": flat.std(0), "min": flat.min(0), "max": flat.max(0)}


def vector_stats(v: np.ndarray) -> dict[str, np.ndarray]:
    """lerobot's statistics of one feature over every step (float32), quantiles included."""
    s = {"min": v.min(0), "max": v.max(0), "mean": v.mean(0, dtype=np.float64), "std": v.std(0, dtype=np.float64)}
    for q in (1, 10, 50, 90, 99):
        s[f"q{q:02d}"] = np.quantile(v, q / 100, axis=0)
    return {k: np.asarray(x, np.float32) for k, x in s.items()}


def resolve(variant: dict) -> dict:
    """BASE[base] with the variant's fields: (features, DiffusionConfig kwargs)."""
    base = copy.deepcopy(BASE[variant["base"]])
    fields = copy.deepcopy(variant["fields"])
    base["features"].update(fields.pop("features", {}))
    base["normalization_mapping"].update(fields.pop("normalization_mapping", {}))
    base.update(fields)
    return base


def build_config(spec: dict):
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    kw = {k: v for k, v in spec.items() if k not in ("features", "normalization_mapping")}
    for k in ("down_dims", "crop_shape", "resize_shape"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    return DiffusionConfig(
        input_features={k: PolicyFeature(type=FeatureType[t], shape=tuple(s)) for k, (t, s) in spec["features"].items()},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        normalization_mapping={k: NormalizationMode[v] for k, v in spec["normalization_mapping"].items()},
        device="cpu", push_to_hub=False, **kw)


def feature_array(data: Data, feat: str, shape: tuple) -> np.ndarray | None:
    if feat == "observation.state":
        return data.vec["state5" if tuple(shape) == (5,) else "observation.state"]
    if feat == "observation.environment_state":
        return data.vec["env18" if tuple(shape) == (18,) else "observation.environment_state"]
    return None


def make_policy(config, base_sd: dict | None, data: Data, pre, bn_images: np.ndarray | None, new_policy=None):
    """lerobot's DiffusionPolicy, random init, made small to commit:
    1. torch.manual_seed(INIT_SEED); DiffusionPolicy(config);
    2. every GroupNorm of the U-Net (and BatchNorm of the backbone): weight ~ U(0.5, 1.5), bias ~ N(0, 0.1);
    3. every ResNet conv weight: a random 99.5 % set to +0.0 (KEEP);
    4. every float parameter cut to bfloat16 and then to 4 mantissa bits (kept float32; the network computes
       in float32 as any other);
    5. every tensor whose name and shape equal the base fixture's (base_sd) copied from it, so fixtures share
       most bytes (xz stores them once);
    6. BatchNorm backbones: running statistics from 6 train-mode passes over real frames.
    new_policy: builds the policy (default DiffusionPolicy(config); lerobot 0.3.3 passes its dataset_stats);
    pre: the input normalization for step 6 (None: the policy's own normalize_inputs, lerobot <= 0.3).
    Statistics buffers (lerobot <= 0.3: normalize_inputs.* and the like) are never copied in step 5.
    """
    import torch
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    torch.manual_seed(INIT_SEED)
    policy = new_policy() if new_policy is not None else DiffusionPolicy(config)
    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
        if config.image_features:
            for name, m in policy.named_modules():
                if isinstance(m, torch.nn.Conv2d) and ".backbone." in name:
                    m.weight.masked_fill_(torch.rand_like(m.weight) >= KEEP, 0.0)
        for name, p in policy.named_parameters():  # bfloat16's sign and exponent, 4 of its 7 mantissa bits
            if name.startswith(STATISTICS_PREFIXES):  # lerobot <= 0.3 keeps the statistics as parameters
                continue
            p.copy_((p.to(torch.bfloat16).to(torch.float32).view(torch.int32) & MANTISSA_MASK).view(torch.float32))
        shared = 0
        if base_sd is not None:
            sd = policy.state_dict()
            for k, v in sd.items():
                if k in base_sd and base_sd[k].shape == v.shape and base_sd[k].dtype == v.dtype \
                        and not k.endswith(("running_mean", "running_var", "num_batches_tracked")) \
                        and not k.startswith(STATISTICS_PREFIXES):
                    v.copy_(base_sd[k])
                    shared += 1
    if bn_images is not None and config.image_features and not config.use_group_norm:
        gen = np.random.default_rng(INIT_SEED)
        nb = (pre if pre is not None else policy.normalize_inputs)({"observation.image": torch.from_numpy(bn_images),
                  "observation.state": torch.zeros(len(bn_images), config.robot_state_feature.shape[0])})
        encoders = policy.diffusion.rgb_encoder
        encoders = list(encoders) if isinstance(encoders, torch.nn.ModuleList) else [encoders]
        with torch.no_grad():
            for enc in encoders:
                enc.train()
                for _ in range(6):
                    enc(nb["observation.image"][torch.from_numpy(gen.choice(len(bn_images), 8, replace=False))])
    policy.eval()
    return policy, shared


def record_randn():
    """Wrap diffusers' DDPM randn_tensor: returns (draws list, restore)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    real = ddpm_mod.randn_tensor
    draws: list = []

    def recording(*a, **k):
        t = real(*a, **k)
        draws.append(t.clone())
        return t

    ddpm_mod.randn_tensor = recording
    return draws, lambda: setattr(ddpm_mod, "randn_tensor", real)


def sample_case(policy, kind: str, k: int, batch: dict, gc, noise):
    """lerobot's float32 trajectory and executed chunk for one sampler (a config copy with that scheduler)."""
    import torch
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    cfg = copy.deepcopy(policy.config)
    cfg.noise_scheduler_type, cfg.num_inference_steps = kind.upper(), k
    pol = DiffusionPolicy(cfg)
    pol.load_state_dict(policy.state_dict())
    pol.eval()
    draws, restore = record_randn()
    try:
        with torch.no_grad():
            torch.manual_seed(STEP_SEED)
            traj = pol.diffusion.conditional_sample(2, global_cond=gc, noise=noise.clone())
            n = len(draws)
            pol.reset()
            torch.manual_seed(STEP_SEED)
            chunk = pol.predict_action_chunk(batch, noise=noise.clone())
    finally:
        restore()
    steps = len(pol.diffusion.noise_scheduler.timesteps)
    assert steps == k and n == (k - 1 if kind == "ddpm" else 0), (kind, k, steps, n)
    s = cfg.n_obs_steps - 1
    assert torch.equal(chunk, traj[:, s:s + cfg.n_action_steps])
    return pol, traj, chunk, draws[:n]


def float64_run(pol, draws, batch, noise):
    """lerobot's own float64 run of `pol` (its config and weights), same observations, noise and draws."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    import torch
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    real = ddpm_mod.randn_tensor
    torch.set_default_dtype(torch.float64)
    try:
        pol64 = DiffusionPolicy(copy.deepcopy(pol.config))
        pol64.load_state_dict(pol.state_dict())
        pol64.double().eval()
        replay = iter(draws)
        ddpm_mod.randn_tensor = lambda *a, **k: next(replay).double()
        with torch.no_grad():
            b64 = {k: v.double() for k, v in batch.items()}
            gc64 = pol64.diffusion._prepare_global_conditioning(b64)
            traj64 = pol64.diffusion.conditional_sample(2, global_cond=gc64, noise=noise.double())
    finally:
        ddpm_mod.randn_tensor = real
        torch.set_default_dtype(torch.float32)
    return traj64.numpy()


def make_fixture(variant: dict, out: Path, data: Data, stats: dict, base_sd: dict | None, bn_images) -> dict:
    import torch
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    spec = resolve(variant)
    config = build_config(spec)
    feats = spec["features"]
    ds = {"action": stats["action"]}
    for f, (t, shape) in feats.items():
        ds[f] = stats["image"] if t == "VISUAL" else vector_stats(feature_array(data, f, shape))
    ds_t = {f: {k: torch.from_numpy(np.ascontiguousarray(v)).float().reshape(3, 1, 1) if feats.get(f, ("",))[0] == "VISUAL"
                else torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in s.items()} for f, s in ds.items()}
    pre, post = make_pre_post_processors(config, dataset_stats=ds_t)
    policy, shared = make_policy(config, base_sd, data, pre, bn_images)
    out.mkdir(parents=True)
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    rec = {"tensors": len(policy.state_dict()), "tensors_shared_with_base": shared,
           "model_safetensors_bytes": (out / "model.safetensors").stat().st_size}
    if variant["expect"] == REFUSED:
        if not variant["store_weights"]:
            (out / "model.safetensors").unlink()
            rec["weights"] = "not stored: refused from config.json before the weights are read"
        return rec | {"state_dict": policy.state_dict()}

    # references, all from the folder read back
    policy = DiffusionPolicy.from_pretrained(out)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(out))
    if policy.config.compile_model:  # sample eagerly: the wrapped module itself (no inductor build)
        policy.diffusion.unet = policy.diffusion.unet._orig_mod
        policy.config.compile_model = False
    cfg = policy.config
    idx = np.stack([np.arange(int(data.starts[e]) + FRAME, int(data.starts[e]) + FRAME + cfg.n_obs_steps)
                    for e in REF_EPISODES])
    obs, ref = {}, {}
    for f, (t, shape) in feats.items():
        a = data.images(idx) if t == "VISUAL" else feature_array(data, f, shape)[idx]
        obs[f] = torch.from_numpy(np.ascontiguousarray(a))
        ref["obs_" + f[len("observation."):]] = a
    nb = pre(dict(obs))
    batch = {k: v for k, v in nb.items() if k.startswith("observation.")}
    if cfg.image_features:
        batch["observation.images"] = torch.stack([batch[k] for k in cfg.image_features], dim=-4)
    noise = torch.randn((2, cfg.horizon, 2), generator=torch.Generator().manual_seed(NOISE_SEED))
    ref["initial_noise"] = noise.numpy()
    with torch.no_grad():
        gc = policy.diffusion._prepare_global_conditioning(batch)
    ref["global_cond"] = gc.numpy()
    chunk_batch = {k: v for k, v in batch.items() if k != "observation.images"}

    T = cfg.num_train_timesteps
    own = (cfg.noise_scheduler_type.lower(), cfg.num_inference_steps or T)
    other = ("ddim", 10) if own[0] == "ddpm" else ("ddpm", T)
    cases, unavailable = {}, {}
    for kind, k in (own, other):
        try:
            pol, traj, chunk, draws = sample_case(policy, kind, k, chunk_batch, gc, noise)
        except NotImplementedError as e:  # e.g. diffusers' DDIMScheduler has no sigmoid schedule
            assert (kind, k) == other, e
            unavailable[f"{kind}{k}"] = f"lerobot cannot build it: {e}"
            continue
        tag = f"{kind}{k}"
        ref[f"{tag}_trajectory_normalized"], ref[f"{tag}_actions"] = traj.numpy(), post(chunk).numpy()
        ref[f"{tag}_actions_normalized"] = chunk.numpy()
        ref[f"{tag}_timesteps"] = pol.diffusion.noise_scheduler.timesteps.numpy().astype(np.int64)
        if kind == "ddpm":
            ref[f"{tag}_step_noise"] = torch.stack(draws).numpy()
        t64 = float64_run(pol, draws, batch, noise)
        ref[f"{tag}_trajectory_normalized_float64"] = t64
        s = cfg.n_obs_steps - 1
        px64 = post(torch.from_numpy(t64[:, s:s + cfg.n_action_steps]).float()).numpy()
        cases[tag] = {"lerobot_float32_vs_float64_normalized": float(np.abs(traj.numpy() - t64).max()),
                      "lerobot_float32_vs_float64_px": float(np.abs(ref[f"{tag}_actions"] - px64).max()),
                      "trajectory_abs_max_normalized": float(np.abs(t64).max())}
        # how far the field moves lerobot's result: the same weights and draws under the base value
        effect = field_effect(variant, pol, kind, k, draws, batch, noise, t64)
        if effect is not None:
            cases[tag]["field_effect_normalized"] = effect
    np.savez_compressed(out / "reference.npz", **ref)
    return rec | {"samplers": cases, "samplers_lerobot_refuses": unavailable, "default_sampler": f"{own[0]}-{own[1]}", "state_dict": policy.state_dict()}


def field_effect(variant, pol, kind, k, draws, batch, noise, t64, run64=None) -> float | None:
    """max |lerobot(field at the base value) - lerobot(field)| (float64, normalized) where the base config loads
    the same weights and samples the same chain; None where it does not apply (other shapes, other chain).
    run64: the float64 run (default float64_run; lerobot 0.3.3's script passes its own)."""
    if variant["kind"] not in ("sampling",) or variant["expect"] != EXACT:
        return None
    import dataclasses

    field = variant["field"]
    if field in ("num_inference_steps", "noise_scheduler_type") or not hasattr(pol.config, field):
        return None
    cfg = copy.deepcopy(pol.config)
    spec = {f.name: f for f in dataclasses.fields(cfg)}[field]
    default = BASE[variant["base"]].get(field, spec.default if spec.default is not dataclasses.MISSING
                                        else spec.default_factory())
    setattr(cfg, field, default)
    if f"{kind}" != cfg.noise_scheduler_type.lower():
        cfg.noise_scheduler_type = kind.upper()
    cfg.num_inference_steps = k
    try:
        import torch
        from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

        other = DiffusionPolicy(cfg)
        other.load_state_dict(pol.state_dict())
        other.eval()
        if cfg.n_action_steps != pol.config.n_action_steps:
            return None
        t = (run64 or float64_run)(other, draws, batch, noise)
    except Exception:  # noqa: BLE001 - a base value that does not fit these weights: not applicable
        return None
    return float(np.abs(t - t64).max())


def write_archive(fixtures: Path, path: Path) -> tuple[int, int]:
    """Every file under `fixtures` in one solid xz tar (sorted, fixed metadata, so a rerun gives the same bytes):
    (archive bytes, tar bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(fixtures.rglob("*")):
            if p.is_file():
                info = tarfile.TarInfo(str(p.relative_to(fixtures)))
                info.size, info.mtime, info.mode = p.stat().st_size, 0, 0o644
                with p.open("rb") as fh:
                    tar.addfile(info, fh)
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 1, "lp": 2, "pb": 2,
                "dict_size": 192 << 20}]
    path.write_bytes(lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, filters=filters))
    return path.stat().st_size, len(buf.getvalue())


def manifest_entry(variant: dict, rec: dict, cfg_json: dict, version: str, seconds: float) -> dict:
    """One fixture's manifest.json entry (rec: what make_fixture measured, its state_dict popped)."""
    entry = {k: variant[k] for k in ("name", "base", "field", "value", "kind", "note")}
    entry.update({"fields": {k: (list(v) if isinstance(v, tuple) else v) for k, v in variant["fields"].items()
                             if k != "features"} | ({"input_features": {f: [t, list(s)] for f, (t, s) in
                                                                        variant["fields"]["features"].items()}}
                                                     if "features" in variant["fields"] else {}),
                  "lerobot_version": version,
                  "expected": {"outcome": variant["expect"]} | (
                      {"refusal_names": variant["refuse_word"]} if variant["expect"] == REFUSED else {}),
                  "config_json_value_check": {k: cfg_json.get(k) for k in variant["fields"]
                                              if k in cfg_json and k not in ("normalization_mapping",)},
                  "made": rec, "seconds": round(seconds, 1)})
    return entry


def run_sweep(variants: list[dict], make: Callable, archive: str, made_by: str, base_names=("kp_base", "img_base"),
              argv=None) -> None:
    """The command line of both sweep scripts: every variant made by `make` (make_fixture's signature), the
    archive and manifest.json written to --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--zarr", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)

    import diffusers
    import lerobot
    import torch

    torch.set_num_threads(1)  # beside busy processes, a second OpenMP thread stalls every parallel region
    t0 = time.time()
    data = Data(args.zarr)
    stats = {"action": vector_stats(data.vec["action"]),
             "image": {k: np.asarray(v, np.float32) for k, v in data.image_stats().items()}}
    bn_idx = np.concatenate([np.arange(int(data.starts[e]) + 10, int(data.starts[e]) + 22) for e in BN_EPISODES])
    bn_images = data.images(bn_idx)
    versions = {"lerobot": lerobot.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "numpy": np.__version__}
    manifest = {"lerobot_version": lerobot.__version__, "versions": versions,
                "made_by": made_by,
                "archive": archive, "base": {k: {kk: (vv if kk != "features" else
                    {f: [t, list(s)] for f, (t, s) in vv.items()}) for kk, vv in b.items()} for k, b in BASE.items()},
                "statistics": {"action": {k: v.tolist() for k, v in stats["action"].items()},
                               "image": {k: v.tolist() for k, v in stats["image"].items()}},
                "fixtures": []}
    base_sd: dict[str, dict] = {}
    names = set(args.only or [v["name"] for v in variants])
    for variant in variants:
        if variant["name"] not in names:
            continue
        t1 = time.time()
        rec = make(variant, out / "fixtures" / variant["name"], data, stats, base_sd.get(variant["base"]), bn_images)
        sd = rec.pop("state_dict")
        if variant["name"] in base_names:
            base_sd[variant["base"]] = {k: v.clone() for k, v in sd.items()}
        cfg_json = json.loads((out / "fixtures" / variant["name"] / "config.json").read_text())
        manifest["fixtures"].append(manifest_entry(variant, rec, cfg_json, lerobot.__version__, time.time() - t1))
        print(variant["name"], json.dumps(rec.get("samplers", rec.get("weights", "")))[:300], flush=True)

    manifest["archive_bytes"], manifest["archive_uncompressed_bytes"] = write_archive(out / "fixtures",
                                                                                      out / archive)
    manifest["seconds"] = round(time.time() - t0, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({k: manifest[k] for k in ("archive_bytes", "archive_uncompressed_bytes", "seconds")}))


def main() -> None:
    run_sweep(VARIANTS, make_fixture, "lerobot061_sweep.tar.xz", "tests/peers_sweep/make_lerobot_sweep.py")


if __name__ == "__main__":
    main()
