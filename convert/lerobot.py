"""A lerobot pretrained diffusion policy folder (`save_pretrained`) -> dpkit config, normalizer, weights.

    from dpkit.convert.lerobot import read_lerobot
    config, normalizer, weights, source, step = read_lerobot("pretrained_model", name="lerobot_pusht")

Layouts: current lerobot (>= 0.4: statistics in `policy_preprocessor*.json` / `policy_postprocessor*.json`
and their `*_normalizer_processor` / `*_unnormalizer_processor` safetensors, keyed "<feature>.<stat>")
and the earlier one (<= 0.3.x: `normalize_inputs.buffer_<feature>.<stat>` / `unnormalize_outputs.*`
buffers inside model.safetensors). Observations: `observation.state`, at most one camera, an optional
`observation.environment_state`; they keep lerobot's per-step conditioning order [state, image feature,
environment state] (dpkit's `obs_keys`). Normalization: MEAN_STD / MIN_MAX / IDENTITY become dpkit's
affine normalizer (vectors) or the encoder's per-channel image mean/std. The ResNet-18 keeps its norm:
GroupNorm, or BatchNorm with its running statistics (`use_group_norm: false`, dpkit's `encoder_norm`
"batch"). Everything else the model cannot represent exactly is refused naming the config.json field
and value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.errors import DpkitError, InputError
from dpkit.io import sha256_file
from dpkit.io import MAX_JSON_DEPTH, json_depth
from dpkit.train.config import IMAGE_SIZE, Config
from dpkit.train.normalizer import Normalizer

from dpkit.convert.mapping import PEER_FINAL_NORM_GROUPS, resnet_name, unet_name

WEIGHTS = "model.safetensors"
EPS = 1e-8  # lerobot's normalization eps (the processors' default; their .json may carry another)
BETA_DEFAULTS = {"beta_start": 0.0001, "beta_end": 0.02}
# lerobot takes any diffusers beta_schedule for DDPM; dpkit's (and diffusers' DDIMScheduler's) are these three
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")
COMPILED = "_orig_mod."  # compile_model: lerobot saves its torch.compile'd U-Net's tensors under this prefix


def _name(feature: str) -> str:
    """dpkit observation name of a lerobot feature: "observation.environment_state" -> "environment_state"."""
    return feature[len("observation."):].replace(".", "_") if feature.startswith("observation.") else feature


def _refuse(src: Path, field: str, value: Any, why: str) -> None:
    raise DpkitError(f"{src / 'config.json'}: {field} = {json.dumps(value)} is not supported ({why})")


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DpkitError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DpkitError(f"{path} is corrupt or truncated ({e})") from None


def read_json(path: Path) -> Any:
    """A JSON file from outside: nesting deeper than MAX_JSON_DEPTH, bad JSON or an unreadable file is one line."""
    try:
        text = path.read_text()
        if json_depth(text) > MAX_JSON_DEPTH:  # checked before parsing, which recurses
            raise InputError(f"{path}: JSON nesting is deeper than {MAX_JSON_DEPTH} levels; refused")
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DpkitError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise DpkitError(f"cannot read {path}: {e.strerror}") from None


def read_lerobot(folder: str | Path, name: str):
    """(Config, Normalizer, weights with dpkit names, source record, step 0) from a lerobot folder."""
    src = Path(folder)
    cfg = read_json(src / "config.json")
    if not isinstance(cfg, dict):
        raise DpkitError(f"{src / 'config.json'} must hold an object")
    inputs = cfg.get("input_features") or {}
    outputs = cfg.get("output_features") or {}
    if not isinstance(inputs, dict) or not isinstance(outputs, dict):
        raise DpkitError(f"{src / 'config.json'}: input_features / output_features must be objects")

    # --- observations and their order --------------------------------------------------------------
    cams = [k for k, v in inputs.items() if isinstance(v, dict) and v.get("type") == "VISUAL"]
    if len(cams) > 1:
        _refuse(src, "input_features (cameras)", cams, "dpkit's encoder takes one camera")
    if "observation.state" not in inputs:
        _refuse(src, "input_features", sorted(inputs), "lerobot's diffusion policy needs observation.state")
    for k, v in inputs.items():
        kind = v.get("type") if isinstance(v, dict) else None
        if kind not in ("VISUAL", "STATE", "ENV"):
            _refuse(src, f"input_features.{k}.type", kind, "VISUAL, STATE or ENV")
        if kind != "VISUAL" and k not in ("observation.state", "observation.environment_state"):
            _refuse(src, "input_features", k, "vectors are observation.state and observation.environment_state")
    order = ["observation.state"] + cams + [k for k in inputs if k == "observation.environment_state"]
    keys, dims = [], []
    for feat in order:
        shape = inputs[feat].get("shape")
        if feat in cams:
            if list(shape or []) != [3, IMAGE_SIZE, IMAGE_SIZE]:
                _refuse(src, f"input_features.{feat}.shape", shape, f"dpkit's encoder takes [3, {IMAGE_SIZE}, {IMAGE_SIZE}]")
            keys.append("image")
        else:
            if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int)):
                _refuse(src, f"input_features.{feat}.shape", shape, "a vector [D]")
            keys.append(_name(feat))
            dims.append(shape[0])
    action = outputs.get("action")
    if set(outputs) != {"action"} or not isinstance(action, dict) or action.get("shape") != [2]:
        _refuse(src, "output_features", outputs, "one action of shape [2]")

    # --- architecture --------------------------------------------------------------------------------
    def want(field: str, ok: Any, why: str, default: Any = None) -> Any:
        value = cfg.get(field, default)
        if not (ok(value) if callable(ok) else value == ok):
            _refuse(src, field, value, why)
        return value

    image = bool(cams)
    crop = cfg.get("crop_shape")
    if image:
        want("vision_backbone", "resnet18", "dpkit's encoder is a ResNet-18")
        # GroupNorm (lerobot's default) or torchvision's BatchNorm: dpkit's encoder has both (encoder_norm)
        want("use_group_norm", lambda v: isinstance(v, bool), "true or false", default=True)
        want("resize_shape", None, "no resize step in dpkit's encoder")
        # crop_ratio only derives crop_shape from resize_shape (refused above): without one, lerobot ignores it
        if crop is not None and not (isinstance(crop, list) and len(crop) == 2 and crop[0] == crop[1]):
            _refuse(src, "crop_shape", crop, "a square crop")
    want("use_film_scale_modulation", True, "dpkit's FiLM always predicts scale and bias")
    sched_kind = want("noise_scheduler_type", lambda v: v in ("DDPM", "DDIM"), "DDPM or DDIM")
    want("beta_schedule", lambda v: v in BETA_SCHEDULES, f"dpkit's schedules: {', '.join(BETA_SCHEDULES)}",
         default="squaredcos_cap_v2")
    pred = want("prediction_type", lambda v: v in ("epsilon", "sample"), "epsilon or sample", default="epsilon")
    if cfg.get("beta_schedule") != "squaredcos_cap_v2":  # the cosine schedule ignores beta_start/end
        for key, value in BETA_DEFAULTS.items():
            want(key, value, f"dpkit's linear schedules use {value}", default=value)
    T = cfg.get("num_train_timesteps", 100)
    k = cfg.get("num_inference_steps") or T

    # --- normalization statistics ------------------------------------------------------------------
    tensors = _load_safetensors(src / WEIGHTS)
    modes = cfg.get("normalization_mapping") or {}
    stats, layout = _statistics(src, tensors, inputs, action)
    vec = {}
    for feat in order + ["action"]:
        ftype = "ACTION" if feat == "action" else inputs[feat]["type"]
        mode = modes.get(ftype, "IDENTITY")
        if mode not in ("MEAN_STD", "MIN_MAX", "IDENTITY"):
            _refuse(src, f"normalization_mapping.{ftype}", mode, "MEAN_STD, MIN_MAX or IDENTITY")
        s = stats.get(feat, {})
        need = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "IDENTITY": ()}[mode]
        for stat in need:
            v = s.get(stat)
            if v is None:
                raise DpkitError(f"{src}: no {feat}.{stat} statistics ({layout}); {mode} needs them")
            if not np.all(np.isfinite(v)):
                raise DpkitError(f"{src}: {feat}.{stat} statistics are not finite ({layout})")
        # A spread <= 0 is damaged statistics: it would become a zero or negative (mirrored) scale.
        if mode == "MEAN_STD" and np.any(s["std"] <= 0):
            raise DpkitError(f"{src}: {feat}.std statistics must be > 0, got {float(s['std'].min()):g} ({layout})")
        if mode == "MIN_MAX" and np.any(s["max"] < s["min"]):
            raise DpkitError(f"{src}: {feat}.max statistics are below its min ({layout})")
        if feat in cams:
            if mode == "MIN_MAX":
                _refuse(src, "normalization_mapping.VISUAL", mode, "images: MEAN_STD or IDENTITY")
            mean = s["mean"].reshape(-1) if mode == "MEAN_STD" else np.zeros(3)
            std = s["std"].reshape(-1) + EPS if mode == "MEAN_STD" else np.ones(3)
            if mean.size != 3 or std.size != 3:
                raise DpkitError(f"{src}: {feat} statistics must be per channel (3 values), got {mean.size}")
            image_norm = ([float(v) for v in mean], [float(v) for v in std])
            continue
        vector_keys = [key for key in keys if key != "image"]  # obs_dims: the vectors only, in keys' order
        size = dims[vector_keys.index(_name(feat))] if feat != "action" else 2
        vec["action" if feat == "action" else _name(feat)] = _affine(src, feat, mode, s, size, layout)
    try:
        normalizer = Normalizer(vec)
    except DpkitError as e:
        raise DpkitError(f"{src}: {e}") from None

    # --- the dpkit config -------------------------------------------------------------------------
    policy_cfg: dict[str, Any] = {
        "obs_mode": "image" if image else "lowdim", "obs_keys": keys, "obs_dims": dims,
        "n_obs_steps": cfg.get("n_obs_steps"), "horizon": cfg.get("horizon"),
        "n_action_steps": cfg.get("n_action_steps"), "action_dim": 2,
        "down_dims": cfg.get("down_dims"), "kernel_size": cfg.get("kernel_size"), "n_groups": cfg.get("n_groups"),
        "final_norm_groups": PEER_FINAL_NORM_GROUPS,  # lerobot's final block: 8 groups whatever n_groups
        "diffusion_step_embed_dim": cfg.get("diffusion_step_embed_dim"),
        "num_train_timesteps": T, "beta_schedule": cfg.get("beta_schedule"),
        "clip_sample": cfg.get("clip_sample", True), "clip_sample_range": cfg.get("clip_sample_range", 1.0),
        "prediction_type": pred,
    }
    if sched_kind == "DDIM":
        policy_cfg["ddim_steps"] = k
    else:  # lerobot samples DDPM with num_inference_steps (null: all num_train_timesteps)
        policy_cfg["default_sampler"], policy_cfg["ddpm_steps"] = "ddpm", k
    if image:
        nkp = cfg.get("spatial_softmax_num_keypoints")
        policy_cfg.update({"crop_size": crop[0] if crop else IMAGE_SIZE, "resnet_width": 64,
                           "spatial_softmax_keypoints": nkp, "image_feature_dim": 2 * nkp if isinstance(nkp, int) else nkp,
                           "image_mean": image_norm[0], "image_std": image_norm[1],
                           "encoder_norm": "group" if cfg.get("use_group_norm", True) else "batch"})
    try:
        config = Config.from_dict({"name": name, "policy": policy_cfg, "train": {"ema": False}})
    except DpkitError as e:
        raise DpkitError(f"{src / 'config.json'} does not fit dpkit's model ({e})") from None

    # --- weights ---------------------------------------------------------------------------------------
    if image:
        _check_norm_tensors(src, tensors, cfg.get("use_group_norm", True))
    weights = {}
    enc_prefixes = ("diffusion.rgb_encoder.0.", "diffusion.rgb_encoder.")
    for key, value in tensors.items():
        if key.startswith(("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")):
            continue
        mapped = None
        if key.startswith("diffusion.unet."):
            rest = key[len("diffusion.unet."):]
            if cfg.get("compile_model") is True and rest.startswith(COMPILED):  # the same tensors, compiled module
                rest = rest[len(COMPILED):]
            mapped = unet_name(rest)
        elif image and key.startswith("diffusion.rgb_encoder."):
            sep = cfg.get("use_separate_rgb_encoder_per_camera", False)
            rest = key[len(enc_prefixes[0 if sep else 1]):] if key.startswith(enc_prefixes[0 if sep else 1]) else None
            if rest == "pool.pos_grid":
                _check_grid(src, value, config)
                continue
            mapped = resnet_name(rest) if rest is not None else None
        if mapped is None:
            raise DpkitError(f"{src / WEIGHTS}: tensor {key!r} has no place in dpkit's model")
        weights[mapped] = value

    files = sorted(p for p in src.iterdir() if p.is_file() and (p.suffix in (".json", ".safetensors")))
    source = {"format": "lerobot", "version": layout, "path": str(src.resolve()),
              "sha256": sha256_file(src / WEIGHTS), "files": {p.name: sha256_file(p) for p in files},
              "weights": "model", "sampler": f"{sched_kind.lower()}-{k}",
              "observations": {o: ("image" if o in cams else _name(o)) for o in order}}
    return config, normalizer, weights, source, 0


def _affine(src: Path, feat: str, mode: str, s: dict[str, np.ndarray], size: int, layout: str) -> dict[str, Any]:
    """dpkit's normalizer entry (x * scale + offset) equal to lerobot's `mode` for one feature."""
    for stat, v in s.items():
        if v.size != size:
            raise DpkitError(f"{src}: {feat}.{stat} has {v.size} values, the feature has {size}")
    if mode == "MIN_MAX":
        lo, hi = s["min"].astype(np.float64), s["max"].astype(np.float64)
        rng = hi - lo
        # 0.6.1 divides by (max - min), eps only where they are equal; <= 0.3.x always adds eps.
        rng = rng + EPS if layout.startswith("model.safetensors") else np.where(rng == 0, EPS, rng)
        scale = 2.0 / rng
        offset = -1.0 - lo * scale
    elif mode == "MEAN_STD":
        lo, hi = s.get("min", s["mean"]).astype(np.float64), s.get("max", s["mean"]).astype(np.float64)
        scale = 1.0 / (s["std"].astype(np.float64) + EPS)
        offset = -s["mean"].astype(np.float64) * scale
    else:
        lo, hi = np.zeros(size), np.zeros(size)
        scale, offset = np.ones(size), np.zeros(size)
    return {"min": lo.tolist(), "max": hi.tolist(), "scale": scale.tolist(), "offset": offset.tolist()}


def _statistics(src: Path, tensors: dict[str, Any], inputs: dict, action: dict) -> tuple[dict, str]:
    """{feature: {stat: float64 array}} and the layout they came from."""
    pre, post = sorted(src.glob("policy_preprocessor*.json")), sorted(src.glob("policy_postprocessor*.json"))
    if pre or post:
        if not (pre and post):
            raise DpkitError(f"{src}: has {'policy_preprocessor' if pre else 'policy_postprocessor'}*.json but not "
                             f"the {'postprocessor' if pre else 'preprocessor'} (incomplete save_pretrained folder)")
        stats: dict[str, dict[str, np.ndarray]] = {}
        for path, step_name, feats in ((pre[0], "normalizer_processor", [f for f in inputs]),
                                        (post[0], "unnormalizer_processor", ["action"])):
            steps = (read_json(path) or {}).get("steps", [])
            step = next((s for s in steps if isinstance(s, dict) and s.get("registry_name") == step_name), None)
            if step is None or not isinstance(step.get("state_file"), str):
                raise DpkitError(f"{path}: no {step_name} step with a state_file")
            eps = (step.get("config") or {}).get("eps", EPS)
            if eps != EPS:
                raise DpkitError(f"{path}: {step_name} eps = {eps} is not supported (lerobot's default {EPS})")
            table = _load_safetensors(src / Path(step["state_file"]).name)
            for feat in feats:
                for stat in ("mean", "std", "min", "max"):
                    if f"{feat}.{stat}" in table:
                        stats.setdefault(feat, {})[stat] = table[f"{feat}.{stat}"].double().numpy()
        return stats, "lerobot >= 0.4 (processor files)"
    stats = {}
    for key, value in tensors.items():
        for prefix in ("normalize_inputs.buffer_", "unnormalize_outputs.buffer_"):
            if key.startswith(prefix):
                feat_u, stat = key[len(prefix):].rsplit(".", 1)
                feat = next((f for f in list(inputs) + ["action"] if f.replace(".", "_") == feat_u), None)
                if feat is not None and (prefix.startswith("normalize_inputs") or feat == "action"):
                    stats.setdefault(feat, {})[stat] = value.double().numpy()
    if not stats:
        raise DpkitError(f"{src}: no normalization statistics (neither policy_*processor files nor "
                         f"normalize_inputs.* buffers in {WEIGHTS})")
    return stats, "model.safetensors buffers (lerobot <= 0.3)"


def _check_norm_tensors(src: Path, tensors: dict[str, Any], group_norm: bool) -> None:
    """The encoder's norm tensors must be what use_group_norm says: BatchNorm running statistics exactly
    when it is false (GroupNorm has none), and valid ones (a variance is >= 0)."""
    stats = [k for k in tensors
             if k.startswith("diffusion.rgb_encoder.") and k.endswith((".running_mean", ".running_var"))]
    if group_norm and stats:
        raise DpkitError(f"{src / 'config.json'}: use_group_norm = true but {WEIGHTS} holds BatchNorm running "
                         f"statistics ({stats[0]!r}, {len(stats)} such)")
    if not group_norm and not stats:
        raise DpkitError(f"{src / 'config.json'}: use_group_norm = false but {WEIGHTS} holds no BatchNorm running "
                         f"statistics (running_mean / running_var): the encoder's weights are not a BatchNorm ResNet")
    for k in stats:
        if k.endswith(".running_var") and bool((tensors[k] < 0).any()):
            raise DpkitError(f"{src / WEIGHTS}: BatchNorm statistics {k!r} has a negative variance")


def _check_grid(src: Path, grid: Any, config: Config) -> None:
    """lerobot's spatial-softmax position grid must be the one dpkit's encoder computes from the crop."""
    from dpkit.train.vision import ResNet18Trunk, SpatialSoftmax

    side = ResNet18Trunk.output_size(config.policy.crop_size)
    ours = SpatialSoftmax(1, side, side, 1).grid
    if tuple(grid.shape) != tuple(ours.shape) or float((grid.float() - ours).abs().max()) > 1e-6:
        raise DpkitError(f"{src / WEIGHTS}: the spatial softmax grid {list(grid.shape)} does not match a "
                         f"{side}x{side} feature map of crop {config.policy.crop_size}")


