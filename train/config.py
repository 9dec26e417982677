"""Validated configuration: one dataclass per concern, YAML files plus `key=value` overrides.

    from dpkit.train.config import load_config
    cfg = load_config("tiny", ["train.batch_size=32", "policy.horizon=10"])

Named configs live in `train/configs/NAME.yaml`; a path to any YAML file works too. The resolved config
is saved with every checkpoint (`Config.to_dict`) and rebuilt from it (`Config.from_dict`), so a
checkpoint alone is enough to rebuild its model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpkit.errors import DpkitError

CONFIG_DIR = Path(__file__).parent / "configs"

LOWDIM_OBS_DIM = 20  # 9 keypoints (x, y) + agent (x, y)
IMAGE_SIZE = 96


@dataclass
class PolicyConfig:
    obs_mode: str = "image"
    """"image" (96x96 RGB + agent position) or "lowdim" (9 keypoints + agent position)."""
    n_obs_steps: int = 2
    """To: observation history length."""
    horizon: int = 16
    """H: length of the predicted action trajectory."""
    n_action_steps: int = 8
    """Ta: actions executed per chunk, starting at index n_obs_steps - 1."""
    action_dim: int = 2

    # Image encoder (obs_mode == "image").
    crop_size: int = 84
    """Random crop in training, center crop at inference; 96 disables cropping."""
    resnet_width: int = 64
    """Channels of the ResNet-18's first stage (64 is the standard network; tiny uses less)."""
    spatial_softmax_keypoints: int = 32
    image_feature_dim: int = 64
    """Per-image feature width after the spatial-softmax head."""

    # Conditional 1D U-Net.
    down_dims: tuple[int, ...] = (512, 1024, 2048)
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    skip_connection: str = "concat"
    """How decoder blocks take the encoder's features: "concat" (original) or "add"."""

    # Diffusion.
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    ddim_steps: int = 10
    """Default DDIM step count (inference)."""

    @property
    def first_action_index(self) -> int:
        return self.n_obs_steps - 1

    def validate(self) -> None:
        _check(self.obs_mode in ("image", "lowdim"), f"policy.obs_mode must be 'image' or 'lowdim', got {self.obs_mode!r}")
        _check(self.n_obs_steps >= 1, "policy.n_obs_steps must be >= 1")
        _check(self.n_action_steps >= 1, "policy.n_action_steps must be >= 1")
        _check(
            self.first_action_index + self.n_action_steps <= self.horizon,
            f"policy.horizon ({self.horizon}) must be >= n_obs_steps - 1 + n_action_steps "
            f"({self.first_action_index + self.n_action_steps})",
        )
        _check(len(self.down_dims) >= 1, "policy.down_dims must not be empty")
        for d in self.down_dims:
            _check(d % self.n_groups == 0, f"policy.down_dims entry {d} is not divisible by n_groups={self.n_groups}")
        _check(self.kernel_size % 2 == 1, "policy.kernel_size must be odd")
        _check(self.skip_connection in ("concat", "add"), "policy.skip_connection must be 'concat' or 'add'")
        _check(self.resnet_width >= 8, "policy.resnet_width must be >= 8")
        _check(16 <= self.crop_size <= IMAGE_SIZE, f"policy.crop_size must be in [16, {IMAGE_SIZE}]")
        _check(self.prediction_type == "epsilon", "policy.prediction_type: only 'epsilon' is supported")
        _check(self.num_train_timesteps >= 2, "policy.num_train_timesteps must be >= 2")
        _check(1 <= self.ddim_steps <= self.num_train_timesteps, "policy.ddim_steps must be in [1, num_train_timesteps]")


@dataclass
class DataConfig:
    path: str | None = None
    """Dataset (.zarr folder or .zarr.zip); None: --data, $DPKIT_PUSHT_DATA, data/pusht/, ../shared/data/pusht/."""
    val_ratio: float = 0.02
    max_train_episodes: int | None = 90
    """The paper's image config trains on 90 episodes; None uses every training episode."""
    split_seed: int = 42
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""

    def validate(self) -> None:
        _check(0.0 <= self.val_ratio < 1.0, "data.val_ratio must be in [0, 1)")
        _check(self.max_train_episodes is None or self.max_train_episodes >= 1, "data.max_train_episodes must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")


@dataclass
class TrainConfig:
    steps: int = 100_000
    """Total optimizer steps (--steps)."""
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 500
    grad_accum_steps: int = 1
    mixed_precision: str = "no"
    """accelerate mixed precision: "no", "bf16" or "fp16"."""
    ema: bool = True
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    seed: int = 42
    time_limit_s: float = 0.0
    """Stop (and checkpoint) after this many seconds of training, before `steps` if need be (0: no limit)."""
    log_every: int = 10
    val_every: int = 500
    val_batches: int = 8
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 0
    """Rollout evaluation in gym-pusht every N steps (0: off); keeps the best checkpoint by score."""
    eval_episodes: int = 10
    eval_max_steps: int = 300

    def validate(self) -> None:
        _check(self.steps >= 1, "train.steps must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size must be >= 1")
        _check(self.lr > 0, "train.lr must be > 0")
        _check(all(0 <= b < 1 for b in self.betas), "train.betas must be two numbers in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(self.lr_scheduler in ("cosine", "constant", "linear"), "train.lr_scheduler must be cosine, constant or linear")
        _check(self.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1")
        _check(self.mixed_precision in ("no", "bf16", "fp16"), "train.mixed_precision must be no, bf16 or fp16")
        _check(0 < self.ema_max_decay < 1, "train.ema_max_decay must be in (0, 1)")
        for k in ("log_every", "val_every", "checkpoint_every"):
            _check(getattr(self, k) >= 1, f"train.{k} must be >= 1")
        _check(self.time_limit_s >= 0, "train.time_limit_s must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.eval_every >= 0 and self.eval_episodes >= 1, "train.eval_every must be >= 0, eval_episodes >= 1")


@dataclass
class Config:
    name: str = "custom"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.policy.validate()
        self.data.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        _apply(cfg, d, prefix="")
        return cfg.validate()


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise DpkitError(f"bad config: {msg}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/override value to the field's declared type (`int | None`, `tuple[int, ...]`, ...)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        raise DpkitError(f"bad config: {key} has an unsupported type {tp}")  # not used by any field
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise DpkitError(f"bad config: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise DpkitError(f"bad config: {key} must be a list of {len(args)}, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise DpkitError(f"bad config: {key} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:  # YAML reads "3e-4" as a string
                value = float(value)
            except ValueError:
                raise DpkitError(f"bad config: {key} expects a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DpkitError(f"bad config: {key} expects a number, got {value!r}")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise DpkitError(f"bad config: {key} must be an integer, got {value!r}")
            return int(value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DpkitError(f"bad config: {key} expects a string, got {value!r}")
        return value
    raise DpkitError(f"bad config: {key} has an unsupported type {tp}")


def _apply(obj: Any, d: dict[str, Any], prefix: str) -> None:
    if not isinstance(d, dict):
        raise DpkitError(f"bad config: {prefix or 'top level'} must be a mapping")
    names = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in d.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise DpkitError(f"unknown config key {full!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 3e-4); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise DpkitError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise DpkitError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a named config (`tiny`, `pusht_lowdim`, `pusht_image`) or a YAML path, then apply overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise DpkitError(f"config {name_or_path!r} not found (named configs: {known}; or give a YAML path)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DpkitError(f"config {path} is not valid YAML: {e}") from None
    cfg = Config(name=path.stem)
    _apply(cfg, raw, prefix="")
    for text in overrides:
        keys, value = parse_override(text)
        nested: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            nested = {k: nested}
        _apply(cfg, nested, prefix="")
    return cfg.validate()
