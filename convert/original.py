"""The original real-stanford/diffusion_policy `.ckpt` (BaseWorkspace.save_checkpoint) -> dpkit run.

    from dpkit.convert.original import read_original
    config, normalizer, weights, source, step = read_original("latest.ckpt", name="orig", ema=True)

Accepted: the low-dim U-Net policy (DiffusionUnetLowdimPolicy with a ConditionalUnet1D, observations
as global conditioning, the PushT keypoint layout: 9 keypoints then agent x, y = 20 values). The file
is read by dpkit.convert.unpickle (nothing in it is executed). The policy's LinearNormalizer travels as
its own scale/offset (dpkit's normalizer is the same affine map). EMA weights by default, as the
original's eval.py loads them when `training.use_ema`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpkit.errors import DpkitError
from dpkit.train.config import LOWDIM_OBS_DIM, Config
from dpkit.train.normalizer import Normalizer

from dpkit.convert.mapping import unet_name
from dpkit.convert.run import sha256_file
from dpkit.convert.unpickle import load_torch_zip, loads_plain

LOWDIM_POLICY = "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy"
UNET = "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D"
DDPM = "diffusers.schedulers.scheduling_ddpm.DDPMScheduler"
DDIM = "diffusers.schedulers.scheduling_ddim.DDIMScheduler"
BETA_DEFAULTS = {"beta_start": 0.0001, "beta_end": 0.02}


def _get(d: Any, path: str, src: str) -> Any:
    cur = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise DpkitError(f"{src}: cfg.{path} is missing (not a diffusion_policy workspace checkpoint?)")
        cur = cur[part]
    return cur


def _require(ok: bool, src: str, field: str, value: Any, why: str) -> None:
    if not ok:
        raise DpkitError(f"{src}: cfg.{field} = {value!r} is not supported ({why})")


def read_original(path: str | Path, name: str, ema: bool = True):
    """(Config, Normalizer, weights with dpkit names, source record, global step) from an original .ckpt."""
    path = Path(path)
    src = str(path)
    payload = load_torch_zip(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("cfg"), dict) or not isinstance(
            payload.get("state_dicts"), dict):
        raise DpkitError(f"{src} is not a diffusion_policy workspace checkpoint (no 'cfg' and 'state_dicts')")
    cfg = payload["cfg"]
    pol = _get(cfg, "policy", src)
    target = _get(cfg, "policy._target_", src)
    _require(target == LOWDIM_POLICY, src, "policy._target_", target,
             "this converter reads the low-dim U-Net policy, DiffusionUnetLowdimPolicy")
    model = _get(cfg, "policy.model", src)
    _require(model.get("_target_") == UNET, src, "policy.model._target_", model.get("_target_"),
             "dpkit's denoiser is the ConditionalUnet1D")
    _require(model.get("cond_predict_scale", False) is True, src, "policy.model.cond_predict_scale",
             model.get("cond_predict_scale"), "dpkit's FiLM always predicts scale and bias")
    _require(model.get("local_cond_dim") is None, src, "policy.model.local_cond_dim", model.get("local_cond_dim"),
             "no local conditioning")
    for key, want in (("obs_as_global_cond", True), ("obs_as_local_cond", False), ("pred_action_steps_only", False),
                      ("oa_step_convention", True)):
        _require(pol.get(key, want) == want, src, f"policy.{key}", pol.get(key), f"dpkit's model needs {want}")
    obs_dim, action_dim = _get(cfg, "policy.obs_dim", src), _get(cfg, "policy.action_dim", src)
    _require(obs_dim == LOWDIM_OBS_DIM, src, "policy.obs_dim", obs_dim,
             f"dpkit's keypoint observation is PushT's {LOWDIM_OBS_DIM} values: 9 keypoints, then agent x, y")
    _require(cfg.get("n_latency_steps", 0) == 0, src, "n_latency_steps", cfg.get("n_latency_steps"), "must be 0")

    sched = _get(cfg, "policy.noise_scheduler", src)
    kind = {DDPM: "ddpm", DDIM: "ddim"}.get(sched.get("_target_"))
    _require(kind is not None, src, "policy.noise_scheduler._target_", sched.get("_target_"),
             "DDPMScheduler or DDIMScheduler")
    if kind == "ddpm":
        _require(sched.get("variance_type", "fixed_small") == "fixed_small", src,
                 "policy.noise_scheduler.variance_type", sched.get("variance_type"), "dpkit's DDPM is fixed_small")
    else:
        for key, want in (("set_alpha_to_one", True), ("steps_offset", 0)):
            _require(sched.get(key, want) == want, src, f"policy.noise_scheduler.{key}", sched.get(key),
                     f"dpkit's DDIM uses {want}")
    if sched.get("beta_schedule") != "squaredcos_cap_v2":  # the cosine schedule ignores beta_start/end
        for key, want in BETA_DEFAULTS.items():
            _require(sched.get(key, want) == want, src, f"policy.noise_scheduler.{key}", sched.get(key),
                     f"dpkit's linear schedules use {want}")
    num_inference = pol.get("num_inference_steps") or sched.get("num_train_timesteps")

    policy_cfg = {
        "obs_mode": "lowdim",
        "n_obs_steps": _get(cfg, "policy.n_obs_steps", src),
        "horizon": _get(cfg, "policy.horizon", src),
        "n_action_steps": _get(cfg, "policy.n_action_steps", src),
        "action_dim": action_dim,
        "down_dims": list(_get(cfg, "policy.model.down_dims", src)),
        "kernel_size": _get(cfg, "policy.model.kernel_size", src),
        "n_groups": _get(cfg, "policy.model.n_groups", src),
        "diffusion_step_embed_dim": _get(cfg, "policy.model.diffusion_step_embed_dim", src),
        "num_train_timesteps": sched.get("num_train_timesteps", 1000),
        "beta_schedule": sched.get("beta_schedule", "linear"),
        "clip_sample": sched.get("clip_sample", True),
        "prediction_type": sched.get("prediction_type", "epsilon"),
    }
    if kind == "ddim":
        policy_cfg["ddim_steps"] = num_inference
    else:  # the original evaluates DDPM with num_inference_steps (100 = all in its configs)
        policy_cfg["default_sampler"] = "ddpm"
    try:
        config = Config.from_dict({"name": name, "policy": policy_cfg, "train": {"ema": False}})
    except DpkitError as e:
        raise DpkitError(f"{src}: its cfg does not fit dpkit's model ({e})") from None

    dicts = payload["state_dicts"]
    use_ema = ema and bool(cfg.get("training", {}).get("use_ema", False)) and isinstance(dicts.get("ema_model"), dict)
    which = "ema_model" if use_ema else "model"
    sd = dicts.get(which)
    if not isinstance(sd, dict):
        raise DpkitError(f"{src}: state_dicts[{which!r}] is missing")
    normalizer, weights = _normalizer(sd, src), {}
    for key, value in sd.items():
        if key.startswith("normalizer.") or key in ("_dummy_variable", "mask_generator._dummy_variable"):
            continue
        mapped = unet_name(key[len("model."):]) if key.startswith("model.") else None
        if mapped is None:
            raise DpkitError(f"{src}: state_dicts[{which!r}] tensor {key!r} has no place in dpkit's model")
        weights[mapped] = value

    step = 0
    pickles = payload.get("pickles")
    if isinstance(pickles, dict) and isinstance(pickles.get("global_step"), bytes):
        value = loads_plain(pickles["global_step"], f"{src} (pickles.global_step)")
        step = value if isinstance(value, int) and value >= 0 else 0
    source = {"format": "diffusion_policy", "version": "BaseWorkspace checkpoint (real-stanford/diffusion_policy)",
              "path": str(path.resolve()), "sha256": sha256_file(path), "weights": which,
              "policy": target, "sampler": f"{kind}-{num_inference}", "global_step": step}
    return config, normalizer, weights, source, step


def _normalizer(sd: dict[str, Any], src: str) -> Normalizer:
    stats = {}
    for key in ("obs", "action"):
        p = f"normalizer.params_dict.{key}."
        fields = {"scale": p + "scale", "offset": p + "offset", "min": p + "input_stats.min",
                  "max": p + "input_stats.max"}
        missing = [v for v in fields.values() if v not in sd]
        if missing:
            raise DpkitError(f"{src}: normalizer tensor {missing[0]!r} is missing")
        stats[key] = {f: sd[k].double().reshape(-1).tolist() for f, k in fields.items()}
    try:
        return Normalizer(stats)
    except DpkitError as e:
        raise DpkitError(f"{src}: {e}") from None
