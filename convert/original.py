"""The original real-stanford/diffusion_policy `.ckpt` (BaseWorkspace.save_checkpoint) -> dpkit run.

    from dpkit.convert.original import read_original
    config, normalizer, weights, source, step = read_original("latest.ckpt", name="orig", ema=True)

Accepted: the low-dim U-Net policy (DiffusionUnetLowdimPolicy with a ConditionalUnet1D, observations
as global conditioning, the PushT keypoint layout: 9 keypoints then agent x, y = 20 values) and the
hybrid image policy (DiffusionUnetHybridImagePolicy: one rgb camera through robomimic's ResNet-18 with
GroupNorm, or BatchNorm with its running statistics (`obs_encoder_group_norm: false`, dpkit's encoder_norm
"batch"), + spatial softmax + Linear + ReLU, center crop at eval, plus low-dim vectors such as PushT's
agent_pos; per step the features are concatenated in shape_meta order, e.g. [image feature, agent_pos]).
The file is read by dpkit.convert.unpickle (nothing in it is executed). The policy's LinearNormalizer
travels as its own scale/offset (dpkit's normalizer is the same affine map); the hybrid's image range
normalizer (x * scale + offset, one value for every pixel) becomes the encoder's image mean/std. EMA
weights by default, as the original's eval.py loads them when `training.use_ema`. Everything else that would
sample differently is refused naming the cfg field: diffusers scheduler arguments away from what dpkit's
samplers compute, and extra cfg.policy keys (the original passes them to every noise_scheduler.step()).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpkit.errors import DpkitError
from dpkit.io import sha256_file
from dpkit.train.config import IMAGE_SIZE, LOWDIM_OBS_DIM, Config
from dpkit.train.normalizer import Normalizer

from dpkit.convert.mapping import PEER_FINAL_NORM_GROUPS, resnet_name, unet_name
from dpkit.convert.unpickle import load_torch_zip, loads_plain

LOWDIM_POLICY = "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy"
HYBRID_POLICY = "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy"
UNET = "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D"
DDPM = "diffusers.schedulers.scheduling_ddpm.DDPMScheduler"
DDIM = "diffusers.schedulers.scheduling_ddim.DDIMScheduler"
BETA_DEFAULTS = {"beta_start": 0.0001, "beta_end": 0.02}
CROP_DEFAULT = [76, 76]  # DiffusionUnetHybridImagePolicy's crop_shape when the cfg names none
# the scheduler arguments read above, and diffusers' defaults of the others (each changes the timesteps or the
# reverse step when set otherwise: a checkpoint that sets one is refused by name)
SCHEDULER_HANDLED = {"_target_", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "variance_type",
                     "clip_sample", "clip_sample_range", "prediction_type", "set_alpha_to_one", "steps_offset"}
SCHEDULER_DEFAULTS = {"trained_betas": None, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                      "sample_max_value": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False}
# the policies' own constructor arguments; any other cfg.policy key is passed to noise_scheduler.step()
LOWDIM_KEYS = {"_target_", "model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps",
               "n_obs_steps", "num_inference_steps", "obs_as_local_cond", "obs_as_global_cond",
               "pred_action_steps_only", "oa_step_convention"}
HYBRID_KEYS = {"_target_", "shape_meta", "noise_scheduler", "horizon", "n_action_steps", "n_obs_steps",
               "num_inference_steps", "obs_as_global_cond", "crop_shape", "diffusion_step_embed_dim", "down_dims",
               "kernel_size", "n_groups", "cond_predict_scale", "obs_encoder_group_norm", "eval_fixed_crop"}
STEP_KWARG_DEFAULTS = {"eta": 0.0, "use_clipped_model_output": False}


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
    _require(target in (LOWDIM_POLICY, HYBRID_POLICY), src, "policy._target_", target,
             "this converter reads the U-Net policies DiffusionUnetLowdimPolicy and DiffusionUnetHybridImagePolicy")
    hybrid = target == HYBRID_POLICY
    # the lowdim policy nests its ConditionalUnet1D's arguments under policy.model; the hybrid takes them itself
    unet_at = "policy" if hybrid else "policy.model"
    unet = pol if hybrid else _get(cfg, unet_at, src)
    if not hybrid:
        _require(unet.get("_target_") == UNET, src, "policy.model._target_", unet.get("_target_"),
                 "dpkit's denoiser is the ConditionalUnet1D")
        _require(unet.get("local_cond_dim") is None, src, "policy.model.local_cond_dim", unet.get("local_cond_dim"),
                 "no local conditioning")
    _require(unet.get("cond_predict_scale", hybrid) is True, src, f"{unet_at}.cond_predict_scale",
             unet.get("cond_predict_scale"), "dpkit's FiLM always predicts scale and bias")
    wants = (("obs_as_global_cond", True),) if hybrid else (
        ("obs_as_global_cond", True), ("obs_as_local_cond", False), ("pred_action_steps_only", False),
        ("oa_step_convention", True))
    for key, want in wants:
        _require(pol.get(key, want) == want, src, f"policy.{key}", pol.get(key), f"dpkit's model needs {want}")
    if hybrid:
        obs_keys, obs_dims, camera, action_dim = _hybrid_layout(pol, src)
    else:
        obs_dim, action_dim = _get(cfg, "policy.obs_dim", src), _get(cfg, "policy.action_dim", src)
        _require(obs_dim == LOWDIM_OBS_DIM, src, "policy.obs_dim", obs_dim,
                 f"dpkit's keypoint observation is PushT's {LOWDIM_OBS_DIM} values: 9 keypoints, then agent x, y")
    _require(cfg.get("n_latency_steps", 0) == 0, src, "n_latency_steps", cfg.get("n_latency_steps"), "must be 0")

    sched = _get(cfg, "policy.noise_scheduler", src)
    kind = {DDPM: "ddpm", DDIM: "ddim"}.get(sched.get("_target_"))
    _require(kind is not None, src, "policy.noise_scheduler._target_", sched.get("_target_"),
             "DDPMScheduler or DDIMScheduler")
    if kind == "ddpm":
        # fixed_small_log takes the same variance through exp(0.5 * log(.)) (rounding apart); fixed_large and the
        # learned variances are other samplers
        _require(sched.get("variance_type", "fixed_small") in ("fixed_small", "fixed_small_log"), src,
                 "policy.noise_scheduler.variance_type", sched.get("variance_type"),
                 "dpkit's DDPM is fixed_small (or fixed_small_log, the same variance)")
        _require(sched.get("steps_offset", 0) == 0, src, "policy.noise_scheduler.steps_offset",
                 sched.get("steps_offset"), "dpkit's DDPM uses 0")
    else:
        for key, want in (("set_alpha_to_one", True), ("steps_offset", 0)):
            _require(sched.get(key, want) == want, src, f"policy.noise_scheduler.{key}", sched.get(key),
                     f"dpkit's DDIM uses {want}")
    if sched.get("beta_schedule") != "squaredcos_cap_v2":  # the cosine schedule ignores beta_start/end
        for key, want in BETA_DEFAULTS.items():
            _require(sched.get(key, want) == want, src, f"policy.noise_scheduler.{key}", sched.get(key),
                     f"dpkit's linear schedules use {want}")
    for key, value in sched.items():  # diffusers' other arguments change the timesteps or the x0 step
        if key not in SCHEDULER_HANDLED:
            _require(key in SCHEDULER_DEFAULTS and value == SCHEDULER_DEFAULTS[key], src,
                     f"policy.noise_scheduler.{key}", value,
                     f"dpkit's samplers are diffusers' with {key} at its default"
                     + (f" {SCHEDULER_DEFAULTS[key]!r}" if key in SCHEDULER_DEFAULTS else " (absent)"))
    # Keys the policy does not take itself go to its **kwargs and on to every noise_scheduler.step() call
    # (DDIM's eta, use_clipped_model_output): dpkit's samplers take none but those at their defaults.
    for key, value in pol.items():
        if key not in (HYBRID_KEYS if hybrid else LOWDIM_KEYS):
            _require(STEP_KWARG_DEFAULTS.get(key, ()) == value, src, f"policy.{key}", value,
                     "the original passes it to every noise_scheduler.step(); dpkit's samplers take "
                     + ("it only at its default " + repr(STEP_KWARG_DEFAULTS[key]) if key in STEP_KWARG_DEFAULTS
                        else "no such argument"))
    pred = sched.get("prediction_type", "epsilon")  # diffusers' default
    _require(pred in ("epsilon", "sample"), src, "policy.noise_scheduler.prediction_type", pred, "epsilon or sample")
    num_inference = pol.get("num_inference_steps") or sched.get("num_train_timesteps")

    policy_cfg = {
        "obs_mode": "image" if hybrid else "lowdim",
        "n_obs_steps": _get(cfg, "policy.n_obs_steps", src),
        "horizon": _get(cfg, "policy.horizon", src),
        "n_action_steps": _get(cfg, "policy.n_action_steps", src),
        "action_dim": action_dim,
        "down_dims": list(_get(cfg, f"{unet_at}.down_dims", src)),
        "kernel_size": _get(cfg, f"{unet_at}.kernel_size", src),
        "n_groups": _get(cfg, f"{unet_at}.n_groups", src),
        "final_norm_groups": PEER_FINAL_NORM_GROUPS,  # the original's final block: 8 groups whatever n_groups
        "diffusion_step_embed_dim": _get(cfg, f"{unet_at}.diffusion_step_embed_dim", src),
        "num_train_timesteps": sched.get("num_train_timesteps", 1000),
        "beta_schedule": sched.get("beta_schedule", "linear"),
        "clip_sample": sched.get("clip_sample", True),
        "clip_sample_range": sched.get("clip_sample_range", 1.0),  # diffusers' default
        "prediction_type": pred,
    }
    if kind == "ddim":
        policy_cfg["ddim_steps"] = num_inference
    else:  # the original samples DDPM with num_inference_steps (100 = all in its configs)
        policy_cfg["default_sampler"], policy_cfg["ddpm_steps"] = "ddpm", num_inference

    dicts = payload["state_dicts"]
    use_ema = ema and bool(cfg.get("training", {}).get("use_ema", False)) and isinstance(dicts.get("ema_model"), dict)
    which = "ema_model" if use_ema else "model"
    sd = dicts.get(which)
    if not isinstance(sd, dict):
        raise DpkitError(f"{src}: state_dicts[{which!r}] is missing")
    if hybrid:
        crop = pol.get("crop_shape", CROP_DEFAULT)
        # the original crops only when crop_shape is set (robomimic's CropRandomizer); 96 = no crop in dpkit
        policy_cfg.update({"obs_keys": obs_keys, "obs_dims": obs_dims,
                           "crop_size": IMAGE_SIZE if crop is None else crop[0]})
        policy_cfg.update(_image_fields(sd, camera, f"{src}: state_dicts[{which!r}]"))
        # obs_encoder_group_norm false (the policy's default) keeps robomimic's BatchNorm ResNet-18, which the
        # original evaluates with its running statistics (eval mode): dpkit's encoder_norm "batch"
        group_norm = bool(pol.get("obs_encoder_group_norm", False))
        policy_cfg["encoder_norm"] = "group" if group_norm else "batch"
        _check_norm_tensors(sd, camera, group_norm, f"{src}: state_dicts[{which!r}]")
    try:
        config = Config.from_dict({"name": name, "policy": policy_cfg, "train": {"ema": False}})
    except DpkitError as e:
        raise DpkitError(f"{src}: its cfg does not fit dpkit's model ({e})") from None

    where = f"{src}: state_dicts[{which!r}]"
    normalizer = _normalizer(sd, [k for k in obs_keys if k != "image"] if hybrid else ["obs"], src)
    encoder = _robomimic_weights(sd, camera, config, where) if hybrid else {}
    weights = {}
    for key, value in sd.items():
        if key.startswith(("normalizer.", "obs_encoder.")) or key in ("_dummy_variable",
                                                                      "mask_generator._dummy_variable"):
            continue
        mapped = unet_name(key[len("model."):]) if key.startswith("model.") else None
        if mapped is None:
            raise DpkitError(f"{where} tensor {key!r} has no place in dpkit's model")
        weights[mapped] = value
    weights.update(encoder)

    step = 0
    pickles = payload.get("pickles")
    if isinstance(pickles, dict) and isinstance(pickles.get("global_step"), bytes):
        value = loads_plain(pickles["global_step"], f"{src} (pickles.global_step)")
        step = value if isinstance(value, int) and value >= 0 else 0
    source = {"format": "diffusion_policy", "version": "BaseWorkspace checkpoint (real-stanford/diffusion_policy)",
              "path": str(path.resolve()), "sha256": sha256_file(path), "weights": which,
              "policy": target, "sampler": f"{kind}-{num_inference}", "global_step": step}
    if hybrid:
        source["observations"] = {k: ("image" if k == camera else k) for k in pol["shape_meta"]["obs"]}
    return config, normalizer, weights, source, step


def _normalizer(sd: dict[str, Any], keys: list[str], src: str) -> Normalizer:
    stats = {}
    for key in keys + ["action"]:
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


def _check_norm_tensors(sd: dict[str, Any], camera: str, group_norm: bool, where: str) -> None:
    """The encoder's norm tensors must be what obs_encoder_group_norm says: BatchNorm running statistics exactly
    when it is false (GroupNorm has none), and valid ones (a variance is >= 0)."""
    enc = f"obs_encoder.obs_nets.{camera}."
    stats = [k for k in sd if k.startswith(enc) and k.endswith((".running_mean", ".running_var"))]
    if group_norm and stats:
        raise DpkitError(f"{where}: cfg.policy.obs_encoder_group_norm = True but it holds BatchNorm running statistics "
                         f"({stats[0]!r}, {len(stats)} such)")
    if not group_norm and not stats:
        raise DpkitError(f"{where}: cfg.policy.obs_encoder_group_norm = False but it holds no BatchNorm running "
                         f"statistics: the encoder's weights are not robomimic's BatchNorm ResNet-18")
    for k in stats:
        if k.endswith(".running_var") and bool((sd[k] < 0).any()):
            raise DpkitError(f"{where}: BatchNorm statistics {k!r} has a negative variance")


def _hybrid_layout(pol: dict[str, Any], src: str) -> tuple[list[str], list[int], str, int]:
    """(dpkit obs_keys, obs_dims, the camera's key, action_dim) of a hybrid policy's shape_meta, after
    refusing what dpkit's image encoder does not compute exactly as the original."""
    _require(isinstance(pol.get("obs_encoder_group_norm", False), bool), src, "policy.obs_encoder_group_norm",
             pol.get("obs_encoder_group_norm"), "true (GroupNorm) or false (robomimic's BatchNorm)")
    _require(pol.get("eval_fixed_crop", False) is True, src, "policy.eval_fixed_crop", pol.get("eval_fixed_crop"),
             "without it the original evaluates on robomimic's crops, not the center crop dpkit takes")
    crop = pol.get("crop_shape", CROP_DEFAULT)
    _require(crop is None or (isinstance(crop, list) and len(crop) == 2 and crop[0] == crop[1]
                              and isinstance(crop[0], int)), src, "policy.crop_shape", crop, "a square crop or null")
    meta = _get({"policy": pol}, "policy.shape_meta.obs", src)
    action = _get({"policy": pol}, "policy.shape_meta.action", src)
    _require(isinstance(action, dict) and list(action.get("shape") or []) == [2], src, "policy.shape_meta.action",
             action, "one PushT action of shape [2]")
    keys, dims, cameras = [], [], []
    for key, attr in (meta.items() if isinstance(meta, dict) else []):
        kind = attr.get("type", "low_dim") if isinstance(attr, dict) else None
        shape = list(attr.get("shape") or []) if isinstance(attr, dict) else None
        _require(kind in ("rgb", "low_dim"), src, f"policy.shape_meta.obs.{key}.type", kind, "rgb or low_dim")
        if kind == "rgb":
            cameras.append(key)
            _require(shape == [3, IMAGE_SIZE, IMAGE_SIZE], src, f"policy.shape_meta.obs.{key}.shape", shape,
                     f"dpkit's encoder takes [3, {IMAGE_SIZE}, {IMAGE_SIZE}]")
            keys.append("image")
        else:
            _require(len(shape) == 1 and isinstance(shape[0], int), src, f"policy.shape_meta.obs.{key}.shape",
                     shape, "a vector [D]")
            keys.append(key)
            dims.append(shape[0])
    _require(len(cameras) == 1, src, "policy.shape_meta.obs (rgb keys)", cameras, "dpkit's encoder takes one camera")
    return keys, dims, cameras[0], 2


def _image_fields(sd: dict[str, Any], camera: str, where: str) -> dict[str, Any]:
    """The encoder's sizes (read from its tensors: robomimic fixes them, not the cfg) and the image
    normalizer as per-channel mean/std."""
    enc = f"obs_encoder.obs_nets.{camera}."
    need = {"stem": enc + "backbone.nets.0.weight", "keypoints": enc + "pool.nets.weight", "out": enc + "nets.3.weight",
            "scale": f"normalizer.params_dict.{camera}.scale", "offset": f"normalizer.params_dict.{camera}.offset"}
    for key in need.values():
        if key not in sd:
            raise DpkitError(f"{where} has no tensor {key!r} (not robomimic's VisualCore with a ResNet-18?)")
    scale, offset = sd[need["scale"]].double().reshape(-1), sd[need["offset"]].double().reshape(-1)
    # The original reshapes the image to (-1, scale.numel()): only one value maps every pixel the same way.
    if scale.numel() != 1 or offset.numel() != 1 or not bool(torch.isfinite(torch.cat([scale, offset])).all()):
        raise DpkitError(f"{where}: the {camera!r} normalizer (scale {scale.tolist()}, offset {offset.tolist()}) "
                         f"is not one finite affine map for every pixel")
    a, b = float(scale[0]), float(offset[0])
    if a <= 0:
        raise DpkitError(f"{where}: the {camera!r} normalizer scale {a} is not positive (dpkit's image std is)")
    # x * a + b == (x - mean) / std
    return {"resnet_width": int(sd[need["stem"]].shape[0]),
            "spatial_softmax_keypoints": int(sd[need["keypoints"]].shape[0]),
            "image_feature_dim": int(sd[need["out"]].shape[0]), "image_mean": [-b / a] * 3, "image_std": [1.0 / a] * 3}


def _robomimic_weights(sd: dict[str, Any], camera: str, config: Config, where: str) -> dict[str, Any]:
    """dpkit names of the robomimic VisualCore's tensors: `backbone.nets.*` (torchvision's ResNet children),
    `pool.nets.*` (the spatial softmax's 1x1 conv), `nets.3.*` (the Linear). The VisualCore stores its
    backbone and pool a second time as `nets.0.*` / `nets.1.*`: those must equal the first names. The pool's
    fixed buffers must be what dpkit computes: temperature 1, the position grid of the crop's feature map."""
    from dpkit.train.vision import ResNet18Trunk, SpatialSoftmax

    enc = f"obs_encoder.obs_nets.{camera}."
    canonical: dict[str, Any] = {}
    for key, value in sd.items():
        if not key.startswith("obs_encoder."):
            continue
        rest = key[len(enc):] if key.startswith(enc) else None
        if rest is not None and rest.startswith("nets.0.nets."):
            rest = "backbone." + rest[len("nets.0."):]
        elif rest is not None and rest.startswith("nets.1."):
            rest = "pool." + rest[len("nets.1."):]
        if rest is None:
            raise DpkitError(f"{where} tensor {key!r} has no place in dpkit's model")
        if rest in canonical:
            if not (canonical[rest].shape == value.shape and torch.equal(canonical[rest], value)):
                raise DpkitError(f"{where}: {key!r} differs from {enc + rest!r}, the same robomimic tensor")
            continue
        canonical[rest] = value
    weights = {}
    side = ResNet18Trunk.output_size(config.policy.crop_size)
    grid = SpatialSoftmax(1, side, side, 1).grid
    for rest, value in canonical.items():
        if rest == "pool.temperature":
            if value.numel() != 1 or float(value.reshape(-1)[0]) != 1.0:
                raise DpkitError(f"{where}: spatial softmax temperature {value.reshape(-1).tolist()} is not supported "
                                 f"(dpkit's is 1)")
            continue
        if rest in ("pool.pos_x", "pool.pos_y"):
            ours = grid[:, 0 if rest.endswith("x") else 1]
            if value.numel() != ours.numel() or float((value.reshape(-1).float() - ours).abs().max()) > 1e-6:
                raise DpkitError(f"{where}: the spatial softmax grid {enc + rest!r} {list(value.shape)} does not match "
                                 f"a {side}x{side} feature map of crop {config.policy.crop_size}")
            continue
        if rest.startswith("backbone.nets."):
            mapped = resnet_name("backbone." + rest[len("backbone.nets."):])
        elif rest in ("nets.3.weight", "nets.3.bias"):
            mapped = resnet_name("out." + rest.rsplit(".", 1)[1])
        else:
            mapped = resnet_name(rest)  # pool.nets.weight / bias
        if mapped is None:
            raise DpkitError(f"{where} tensor {enc + rest!r} has no place in dpkit's model")
        weights[mapped] = value
    return weights
