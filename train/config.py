"""Validated configuration: one dataclass per concern, YAML files plus `key=value` overrides.

    from dpkit.train.config import load_config
    cfg = load_config("tiny", ["train.batch_size=32", "policy.horizon=10"])

Named configs live in `train/configs/NAME.yaml`; a path to any YAML file works too. The resolved config
is saved with every checkpoint (`Config.to_dict`) and rebuilt from it (`Config.from_dict`), so a
checkpoint alone is enough to rebuild its model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpkit.errors import DpkitError
from dpkit.sampling_args import MAX_SEED, parse_sampler_label, sampler_label

CONFIG_DIR = Path(__file__).parent / "configs"

LOWDIM_OBS_DIM = 20  # 9 keypoints (x, y) + agent (x, y)
IMAGE_SIZE = 96
ACTION_DIM = 2  # PushT's action: the agent's absolute (x, y) target
OBS_MODES = ("image", "lowdim")
MIN_CROP_SIZE = 33  # smallest crop the ResNet trunk (/32, rounding up) turns into a 2x2 map
MAX_HORIZON = 1024
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample")  # what the denoiser outputs: the noise, or the clean trajectory x0
LR_SCHEDULERS = ("cosine", "linear", "constant")
SPLITS = ("dpkit", "original")
NORMALIZER_EPISODES = ("train", "all")
ENCODER_NORMS = ("group", "batch")


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
    obs_keys: tuple[str, ...] = ()
    """Observation names in per-step conditioning order; () is the obs_mode's own layout ("image",
    "agent_pos" / "obs"). Set by dpkit-convert for policies trained elsewhere (e.g. lerobot's "state",
    "image"); in image mode one of them is "image", every other is a vector normalized by its own key."""
    obs_dims: tuple[int, ...] = ()
    """Sizes of the vector observations of obs_keys, in their order (the image has none)."""

    # Image encoder (obs_mode == "image").
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel normalization of the [0, 1] image inside the encoder, (x - mean) / std; the default
    maps to [-1, 1]. A converted lerobot policy carries its dataset's statistics here."""
    crop_size: int = 84
    """Random crop in training, center crop at inference; 96 disables cropping; at least 33."""
    resnet_width: int = 64
    """Channels of the ResNet-18's first stage (64 is the standard network; tiny uses less)."""
    encoder_norm: str = "group"
    """The ResNet-18's normalization: "group" (GroupNorm, channels // 16 groups, as Diffusion Policy) or
    "batch" (BatchNorm with running statistics, applied in eval mode and in the exported graph; what
    dpkit-convert sets for a lerobot policy trained with use_group_norm: false)."""
    spatial_softmax_keypoints: int = 32
    image_feature_dim: int = 64
    """Per-image feature width after the spatial-softmax head."""

    # Conditional 1D U-Net.
    down_dims: tuple[int, ...] = (512, 1024, 2048)
    kernel_size: int = 5
    n_groups: int = 8
    """GroupNorm groups of every residual block (each down_dims entry must be a multiple)."""
    final_norm_groups: int | None = None
    """GroupNorm groups of the final conv block (width down_dims[0]). The original diffusion_policy and
    lerobot use 8 there whatever n_groups is (their final block keeps GroupNorm's default), and so do dpkit's
    configs and dpkit-convert. None: n_groups, the rule of configs and checkpoints written before this field
    existed (the same network when n_groups is 8), so they load and sample unchanged."""
    diffusion_step_embed_dim: int = 128
    skip_connection: str = "concat"
    """How decoder blocks take the encoder's features: "concat" (original) or "add"."""

    # Diffusion.
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    """Clip the predicted x0 to [-clip_sample_range, clip_sample_range] at every reverse step (diffusers')."""
    clip_sample_range: float = 1.0
    """The clip bound (> 0; used only with clip_sample). The peers let it be any positive value; dpkit-convert
    carries the source's."""
    prediction_type: str = "epsilon"
    """What the denoiser learns to output: "epsilon" (the noise, Diffusion Policy's choice) or "sample" (the
    clean trajectory x0, diffusers' x0-prediction); training's loss target and every sampler follow it."""
    ddim_steps: int = 10
    """Default DDIM step count (inference)."""
    ddpm_steps: int | None = None
    """DDPM step count of the default sampler when default_sampler is "ddpm"; None: all num_train_timesteps
    (the rule of configs written before this field existed). dpkit-convert sets a DDPM source's
    num_inference_steps here (lerobot and the original sample DDPM with that many steps)."""
    default_sampler: str = "ddim"
    """Sampler a call that names none runs: "ddim" (ddim_steps steps) or "ddpm" (ddpm_steps steps);
    dpkit-convert carries a DDPM-configured source's choice; "fewstep" (all fewstep_timesteps) for a
    few-step student."""
    fewstep_timesteps: tuple[int, ...] | None = None
    """A few-step student's timesteps (dpkit-distill), descending: its network predicts the clean trajectory
    (prediction_type "sample") at each, and fewstep-k runs the first k (docs/bundle-format.md, the few-step
    rule). Set, the policy samples only with "fewstep"; None: a diffusion policy (DDPM and DDIM)."""
    fewstep_later_epsilon: bool = False
    """A few-step student's output at its later timesteps (all but the first): False, the U-Net predicts x0
    directly; True, it predicts the noise as its teacher does, and the denoiser turns that into x0 (x0 = (x -
    sqrt(1 - a_t) eps) / sqrt(a_t), inside the exported graph, so the bundle still outputs x0), so the student
    starts there from its teacher's own one-call estimate. The first timestep (pure noise) always predicts x0."""

    @property
    def first_action_index(self) -> int:
        return self.n_obs_steps - 1

    @property
    def default_sampling(self) -> tuple[str, int]:
        """(kind, K) of the default sampler: the one home of this rule (the policy's resolve_sampler and the
        bundle's `scheduler.default_sampler` both read it)."""
        if self.default_sampler == "ddim":
            return "ddim", self.ddim_steps
        if self.default_sampler == "fewstep":
            return "fewstep", len(self.fewstep_timesteps or ())
        return "ddpm", self.num_train_timesteps if self.ddpm_steps is None else self.ddpm_steps

    def validate(self) -> None:
        """Every field in its range, checked here so a bad value fails before any data loads.

        Each bound names why it exists: what would break (or silently go wrong) deep in training, export
        or sampling if it were not refused here."""
        _check_types(self, "policy")
        _check(self.obs_mode in OBS_MODES, f"policy.obs_mode must be 'image' or 'lowdim', got {self.obs_mode!r}")
        # Model dimensions. MAX_HORIZON bounds the time axis (a typo guard: activations are batch x horizon x
        # width, and the dataset's longest episode is 246 steps); n_obs_steps and n_action_steps must fit in it.
        _range("policy.n_obs_steps", self.n_obs_steps, 1, MAX_HORIZON)
        _range("policy.n_action_steps", self.n_action_steps, 1, MAX_HORIZON)
        _range("policy.horizon", self.horizon, 1, MAX_HORIZON)
        _check(
            self.first_action_index + self.n_action_steps <= self.horizon,
            f"policy.horizon ({self.horizon}) must be >= n_obs_steps - 1 + n_action_steps "
            f"({self.first_action_index + self.n_action_steps})",
        )
        # The PushT action is one absolute (x, y) target: the dataset's actions and the environment fix it.
        _check(self.action_dim == ACTION_DIM, f"policy.action_dim must be {ACTION_DIM} (PushT's (x, y) target), "
                                              f"got {self.action_dim}")

        # Observation layout: names are the encoder's (and the bundle's) input names and normalizer keys.
        keys, dims = self.obs_keys, self.obs_dims
        _check(len(set(keys)) == len(keys), f"policy.obs_keys has a repeated name: {list(keys)}")
        _check(all(k.isidentifier() for k in keys), f"policy.obs_keys must be identifiers, got {list(keys)}")
        vectors = [k for k in keys if k != "image"]
        _check(len(dims) == len(vectors), f"policy.obs_dims must give one size per vector observation of "
                                          f"obs_keys ({len(vectors)}: {vectors}), got {list(dims)}")
        _check(all(1 <= d <= 4096 for d in dims), f"policy.obs_dims entries must be in [1, 4096], got {list(dims)}")
        if keys:
            _check(("image" in keys) == (self.obs_mode == "image"),
                   f"policy.obs_keys {list(keys)}: an image policy has exactly one 'image', a lowdim one none")
        _check(all(s > 0 and math.isfinite(s) for s in self.image_std), f"policy.image_std must be positive, "
                                                                          f"got {list(self.image_std)}")

        # Image encoder. The ResNet trunk maps S -> ceil(S / 32); the spatial softmax needs at least a 2x2
        # map (on 1x1 every keypoint is the same constant and the image is ignored), hence crop >= 33.
        _range("policy.crop_size", self.crop_size, MIN_CROP_SIZE, IMAGE_SIZE)
        # >= 8 channels in the first stage (narrower is no longer a ResNet-18 in any useful sense); <= 256
        # (4x the standard network, 2048 channels in the last stage: larger is a typo).
        _range("policy.resnet_width", self.resnet_width, 8, 256)
        _check(self.encoder_norm in ENCODER_NORMS, f"policy.encoder_norm must be one of "
                                                   f"{', '.join(ENCODER_NORMS)}, got {self.encoder_norm!r}")
        for c in (self.resnet_width, 2 * self.resnet_width, 4 * self.resnet_width, 8 * self.resnet_width):
            groups = resnet_groups(c)
            _check(self.encoder_norm != "group" or c % groups == 0,
                   f"policy.resnet_width={self.resnet_width}: a stage of {c} channels is not "
                   f"divisible into its {groups} GroupNorm groups (multiples of 16 always work)")
        _range("policy.spatial_softmax_keypoints", self.spatial_softmax_keypoints, 1, 1024)
        _range("policy.image_feature_dim", self.image_feature_dim, 1, 4096)

        # U-Net. Every level but the last halves the time axis, so more than log2(horizon) + 1 levels only
        # convolve the zero padding; GroupNorm needs n_groups to divide every width; "same" padding
        # (kernel_size // 2 each side) keeps the length only for odd kernels.
        _check(len(self.down_dims) >= 1, "policy.down_dims must not be empty")
        _check(2 ** (len(self.down_dims) - 1) <= self.horizon,
               f"policy.down_dims has {len(self.down_dims)} levels; horizon {self.horizon} allows at most "
               f"{self.horizon.bit_length()} (each level but the last halves the time axis)")
        _range("policy.n_groups", self.n_groups, 1, 4096)
        for d in self.down_dims:
            _range("policy.down_dims entry", d, 1, 8192)
            _check(d % self.n_groups == 0, f"policy.down_dims entry {d} is not divisible by n_groups={self.n_groups}")
        if self.final_norm_groups is not None:
            _range("policy.final_norm_groups", self.final_norm_groups, 1, 4096)
            _check(self.down_dims[0] % self.final_norm_groups == 0,
                   f"policy.final_norm_groups={self.final_norm_groups} does not divide down_dims[0]="
                   f"{self.down_dims[0]} (the final block's width)")
        _check(self.kernel_size >= 1 and self.kernel_size % 2 == 1,
               f"policy.kernel_size must be a positive odd number (same-length convolution), got {self.kernel_size}")
        _check(self.kernel_size <= MAX_HORIZON, f"policy.kernel_size must be <= {MAX_HORIZON}")
        # The sinusoidal step embedding is [sin, cos] halves.
        _check(self.diffusion_step_embed_dim >= 2 and self.diffusion_step_embed_dim % 2 == 0,
               f"policy.diffusion_step_embed_dim must be even and >= 2 (sin and cos halves), "
               f"got {self.diffusion_step_embed_dim}")
        _check(self.diffusion_step_embed_dim <= 8192, "policy.diffusion_step_embed_dim must be <= 8192")
        _check(self.skip_connection in ("concat", "add"), "policy.skip_connection must be 'concat' or 'add'")

        # Diffusion. <= 1000 train steps (DDPM's usual maximum): the bundle lists a DDPM-T sampler (T network
        # calls per chunk) and carries the whole schedule. Beta schedules: those both diffusers samplers
        # (DDPM and DDIM) implement, so every listed sampler can be built.
        _range("policy.num_train_timesteps", self.num_train_timesteps, 2, 1000)
        _check(self.beta_schedule in BETA_SCHEDULES,
               f"policy.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        # The two targets every runtime's reverse step implements (diffusers also has v_prediction).
        _check(self.prediction_type in PREDICTION_TYPES,
               f"policy.prediction_type must be 'epsilon' or 'sample', got {self.prediction_type!r}")
        # diffusers clamps x0 to [-r, r]: r <= 0 would pin every step's x0 to one value (or an empty range).
        _check(self.clip_sample_range > 0, f"policy.clip_sample_range must be > 0, got {self.clip_sample_range}")
        _range("policy.ddim_steps", self.ddim_steps, 1, self.num_train_timesteps, hi_name="num_train_timesteps")
        if self.ddpm_steps is not None:
            _range("policy.ddpm_steps", self.ddpm_steps, 1, self.num_train_timesteps, hi_name="num_train_timesteps")
        _check(self.default_sampler in ("ddim", "ddpm", "fewstep"),
               f"policy.default_sampler must be 'ddim', 'ddpm' or 'fewstep', got {self.default_sampler!r}")
        if self.fewstep_timesteps is not None:
            ts = self.fewstep_timesteps
            _check(isinstance(ts, (list, tuple)) and 1 <= len(ts) <= 16
                   and all(isinstance(t, int) and not isinstance(t, bool) for t in ts),
                   f"policy.fewstep_timesteps must be a list of 1 to 16 integers, got {ts!r}")
            _check(all(0 <= t < self.num_train_timesteps for t in ts) and list(ts) == sorted(set(ts), reverse=True),
                   f"policy.fewstep_timesteps must be distinct, descending and in [0, num_train_timesteps="
                   f"{self.num_train_timesteps}), got {list(ts)}")
            _check(self.prediction_type == "sample" and self.default_sampler == "fewstep",
                   "policy.fewstep_timesteps (a few-step student) needs prediction_type 'sample' and "
                   "default_sampler 'fewstep'")
        else:
            _check(self.default_sampler != "fewstep",
                   "policy.default_sampler 'fewstep' needs policy.fewstep_timesteps (a few-step student)")
            _check(not self.fewstep_later_epsilon,
                   "policy.fewstep_later_epsilon is for a few-step student (policy.fewstep_timesteps)")


@dataclass
class DataConfig:
    path: str | None = None
    """Dataset (.zarr folder or .zarr.zip); None: --data, $DPKIT_PUSHT_DATA, data/pusht/, ../shared/data/pusht/."""
    val_ratio: float = 0.02
    max_train_episodes: int | None = 90
    """The paper's image config trains on 90 episodes; None uses every training episode."""
    split_seed: int = 42
    split: str = "dpkit"
    """How episodes are split into train/val given split_seed: "dpkit" (one permutation) or "original" (the
    original diffusion_policy's algorithm: the same episodes as its code for the same seed)."""
    normalizer_episodes: str = "train"
    """Episodes the normalizer is fitted on: "train" (the training split) or "all" (as the original does)."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""

    def validate(self) -> None:
        """Every field in its range (see PolicyConfig.validate)."""
        _check_types(self, "data")
        _check(self.path is None or self.path.strip() != "", "data.path must be a dataset path or null, got ''")
        # All episodes in validation would leave nothing to train on.
        _check(0.0 <= self.val_ratio < 1.0, f"data.val_ratio must be in [0, 1), got {self.val_ratio}")
        _check(self.max_train_episodes is None or self.max_train_episodes >= 1, "data.max_train_episodes must be >= 1")
        # One range for every seed in dpkit (dpkit.sampling_args.MAX_SEED says what each consumer takes).
        _range("data.split_seed", self.split_seed, 0, MAX_SEED)
        _check(self.split in SPLITS, f"data.split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        _check(self.normalizer_episodes in NORMALIZER_EPISODES,
               f"data.normalizer_episodes must be one of {', '.join(NORMALIZER_EPISODES)}, got {self.normalizer_episodes!r}")
        # Each worker is a forked process; more than 128 is a typo.
        _range("data.num_workers", self.num_workers, 0, 128)


@dataclass
class TrainConfig:
    steps: int = 100_000
    """Total optimizer steps (--steps)."""
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    lr_scheduler: str = "cosine"
    """"cosine", "linear" (decay to 0 at `steps`) or "constant"; each after `lr_warmup_steps` of linear warm-up."""
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
    """Legacy test seeds per evaluation (the paper: 50)."""
    eval_max_steps: int = 300
    eval_start: int = 0
    """No rollout evaluation before this step (the protocol summary is about the end of training)."""
    eval_samplers: tuple[str, ...] = ()
    """Samplers each evaluation runs, as SAMPLER-K (e.g. [ddim-10, ddpm-100]); the first one picks the best
    checkpoint. Empty: the policy's default sampler."""
    eval_last: int = 10
    """The summary reports max and mean over the last this-many evaluations (the paper: 10 checkpoints)."""

    def validate(self) -> None:
        """Every field in its range (see PolicyConfig.validate)."""
        _check_types(self, "train")
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        # AdamW moves each weight by about lr per step: above 1 every run diverges.
        _check(0 < self.lr <= 1, f"train.lr must be in (0, 1], got {self.lr}")
        # Adam's moment decays: 1 would never forget, negative would oscillate.
        _check(all(0 <= b < 1 for b in self.betas), f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        # Decoupled decay shrinks weights by lr * weight_decay per step; above 1 it would flip their sign.
        _check(0 <= self.weight_decay <= 1, f"train.weight_decay must be >= 0 and <= 1, got {self.weight_decay}")
        _check(self.lr_scheduler in LR_SCHEDULERS,
               f"train.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        # 0 disables warm-up; a warm-up longer than train.steps is allowed (a short smoke run of a big config).
        _check(self.lr_warmup_steps >= 0, f"train.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        _check(self.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _check(self.mixed_precision in ("no", "bf16", "fp16"), "train.mixed_precision must be no, bf16 or fp16")
        # EMA decay after k updates is 1 - (1 + k)^-ema_power: a power <= 0 makes it <= 0, which extrapolates
        # past the weights instead of averaging them; max decay 1 would freeze the EMA copy.
        _check(self.ema_power > 0, f"train.ema_power must be > 0, got {self.ema_power}")
        _check(0 < self.ema_max_decay < 1, f"train.ema_max_decay must be in (0, 1), got {self.ema_max_decay}")
        # Seeds random, numpy and torch (trainer.seed_everything); the range is dpkit's one MAX_SEED.
        _range("train.seed", self.seed, 0, MAX_SEED)
        _check(self.time_limit_s >= 0, f"train.time_limit_s must be >= 0 (0: no limit), got {self.time_limit_s}")
        for k in ("log_every", "val_every", "checkpoint_every"):
            _check(getattr(self, k) >= 1, f"train.{k} must be >= 1, got {getattr(self, k)}")
        # Validation is switched off with data.val_ratio=0; 0 batches would average over nothing.
        _check(self.val_batches >= 1, f"train.val_batches must be >= 1 (data.val_ratio=0 turns validation off), "
                                      f"got {self.val_batches}")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(self.eval_every >= 0, f"train.eval_every must be >= 0 (0: off), got {self.eval_every}")
        # Every evaluation runs all its episodes (up to eval_max_steps steps each): more than 10,000 is a typo.
        _range("train.eval_episodes", self.eval_episodes, 1, 10_000)
        _check(self.eval_max_steps >= 1, f"train.eval_max_steps must be >= 1, got {self.eval_max_steps}")
        _check(self.eval_start >= 0, f"train.eval_start must be >= 0, got {self.eval_start}")
        try:
            labels = [sampler_label(*parse_sampler_label(v, "train.eval_samplers entry")) for v in self.eval_samplers]
        except DpkitError as e:
            raise DpkitError(f"bad config: {e}") from None
        _check(len(set(labels)) == len(labels), f"train.eval_samplers lists a sampler twice: {list(self.eval_samplers)}")
        self.eval_samplers = tuple(labels)
        _range("train.eval_last", self.eval_last, 1, 10_000)
        if self.eval_every > 0:  # evaluations run at the multiples of eval_every from eval_start to steps
            first = -(-max(self.eval_start, 1) // self.eval_every) * self.eval_every
            _check(first <= self.steps,
                   f"train.eval_every={self.eval_every} from train.eval_start={self.eval_start} runs no evaluation "
                   f"in train.steps={self.steps} (the first would be at step {first}); lower train.eval_start or "
                   f"set train.eval_every=0")


LATER_INPUTS = ("noised_actions", "teacher_path", "student")
ROLLOUT_SEED_END = 100_000
"""Distillation rollouts start below this legacy seed: the original protocol's test seeds begin here
(dpkit.eval.pusht.LEGACY_TEST_SEED), and a student must not train on the states it is scored from."""


def off_chain(distill: "DistillConfig", num_train_timesteps: int) -> list[int]:
    """The later student timesteps that the teacher's DDIM chain from the first one does not visit (steps of
    num_train_timesteps // teacher_ddim_steps): inputs taken from that chain ("teacher_path", rollout
    windows) need none."""
    stride = num_train_timesteps // distill.teacher_ddim_steps
    return [t for t in distill.timesteps[1:] if (distill.timesteps[0] - t) % stride]


@dataclass
class DistillConfig:
    """Distillation into a few-step student (dpkit-distill): the trainer's mode when `teacher` is set.

    Each training window gets one of the student's timesteps; its input is pure noise at the first (what
    sampling starts from) and the window's actions noised to that level at the others; its target is what
    the teacher's deterministic DDIM chain makes of that input (steps of num_train_timesteps //
    teacher_ddim_steps, from the input's timestep to the end). The student regresses onto it."""

    teacher: str | None = None
    """The teacher: a dpkit run folder (trained, or written by dpkit-convert) or one of its checkpoints; its
    latest checkpoint's EMA weights. None: ordinary training."""
    timesteps: tuple[int, ...] = (99, 49)
    """The student's timesteps, descending (policy.fewstep_timesteps): fewstep-k runs the first k."""
    teacher_ddim_steps: int = 10
    """The teacher's ODE: DDIM with this many steps over the whole chain (its step size T // this)."""
    draws_per_window: int = 0
    """0: every time a window is drawn it gets a fresh level and noise, and the teacher runs. N >= 1: each
    window has N fixed draws (level and noise, a function of the window, the draw and train.seed); a draw's
    teacher target is computed once and kept in memory (about 2 x horizon x action_dim floats per draw), so
    the teacher's cost is paid once per draw and the budget goes to student steps. A resumed run recomputes
    what its cache lost and follows the same curve."""
    unexecuted_weight: float = 1.0
    """The loss weight of the trajectory steps a chunk does not execute (all but the n_action_steps from
    n_obs_steps - 1), relative to the executed ones: 1.0 is the plain MSE over the whole horizon; lower puts
    the student's fit where the controller acts."""
    pseudo_huber: float = 0.0
    """0: the (weighted) mean-squared loss. c > 0: each window's mean square e counts as sqrt(e + c^2) - c,
    quadratic below an RMS error of about c (in normalized action units) and linear above it, so the windows
    the student misses most weigh less than under the squared loss."""
    later_inputs: str = "noised_actions"
    """The input at the student's later timesteps. "noised_actions": the window's actions noised to that
    level, with the teacher's chain from there (one chain per input). "teacher_path": the state the
    teacher's chain from pure noise passes through at that level, so one chain (from the first timestep)
    gives an input and target for every level; the later timesteps must lie on that chain. "student": what the
    student's own sampler feeds that call (its earlier calls from pure noise, each output re-noised by the
    few-step rule), with the teacher's chain from there: the later calls learn to finish the student's own
    first guesses as the teacher would. Those inputs move with the student, so their targets are computed
    every time (about 1 + the chain's steps network calls per such row, no caching)."""
    later_epsilon: bool = False
    """The student's later calls predict the noise, turned into x0 inside the network (policy.fewstep_later_epsilon):
    they start from the teacher's own one-call estimate at those levels instead of learning x0 from scratch.
    The bundle and every runtime are unchanged (the denoiser still outputs x0)."""
    later_inputs_from: int = 0
    """With later_inputs "student": the optimizer steps that take the student's own states, those after the
    first `later_inputs_from` (0: every step); before, the later levels take noised actions (whose targets
    are cached with fixed draws), so the student's first call is trained before its outputs are used."""
    rollout_at: tuple[int, ...] = ()
    """On-policy states: after each of these optimizer steps the EMA student is rolled out in gym-pusht
    (`rollout_episodes` episodes with `rollout_calls` calls per chunk) and the observation windows it acted
    on join the distillation data. Their inputs and targets come from the teacher's chain from pure noise
    (as with later_inputs "teacher_path": there are no demonstrated actions to noise), so the later
    timesteps must lie on that chain. Empty: the demonstrations' windows alone. Low-dim policies only. A
    round past train.steps runs only if a resumed run extends the steps beyond it."""
    rollout_episodes: int = 250
    """Episodes per rollout round: start states of the original protocol's legacy seeds, round r using
    `rollout_seed_start + r * rollout_episodes` on (never the test seeds, 100000 on)."""
    rollout_calls: int = 1
    """The student's calls per chunk in those rollouts (fewstep-k): 1 .. len(timesteps)."""
    rollout_fraction: float = 0.5
    """Once a round has run, this share of every training batch is drawn from the rollout windows (the
    rest stays the demonstrations')."""
    rollout_seed_start: int = 0
    """The first legacy seed the rollouts start from."""
    energy_weight: float = 0.0
    """A distribution-level term beside the regression. 0: off. lambda > 0: each training batch adds lambda x
    the energy score of the student's own few-step samples against the windows' demonstrated actions. For
    `energy_rows` windows the student samples `energy_samples` chunks from fresh noise, and scores each of its
    sampler's outputs (fewstep-1, and fewstep-k from the student's own fewstep-(k-1) output re-noised, with no
    gradient through the earlier call): the mean distance of the samples to the demonstration minus half
    their mean distance to each other. The distance is the loss's own per-window one (weighted, with the
    pseudo-Huber scale), so lambda = 1 weighs a sample as the regression weighs its pair. The score is a
    proper scoring rule (lowest in expectation when the samples are distributed as the data), so it pulls
    against the narrowing a per-sample regression leaves where the teacher's map turns abruptly."""
    energy_rows: int = 16
    """Windows per batch (the first of its demonstration windows) that get the energy term."""
    energy_samples: int = 2
    """Samples per window for the energy term (>= 2: the score needs two to measure their spread)."""
    energy_from: int = 0
    """The optimizer steps that get the energy term: those after the first `energy_from` (0: every step). The
    steps before it are the regression's alone, so the term can finish a regression-trained student inside
    the same run (its steps cost about twice the regression's at the recipe's rows and samples)."""

    def validate(self) -> None:
        _check_types(self, "distill")
        _check(self.teacher is None or self.teacher.strip() != "", "distill.teacher must be a run folder or null")
        _check(1 <= len(self.timesteps) <= 16 and list(self.timesteps) == sorted(set(self.timesteps), reverse=True)
               and all(t >= 0 for t in self.timesteps),
               f"distill.timesteps must be 1 to 16 distinct, descending timesteps >= 0, got {list(self.timesteps)}")
        _range("distill.teacher_ddim_steps", self.teacher_ddim_steps, 1, 1000)
        _range("distill.draws_per_window", self.draws_per_window, 0, 1000)
        _range("distill.unexecuted_weight", self.unexecuted_weight, 0.0, 1.0)
        _range("distill.pseudo_huber", self.pseudo_huber, 0.0, 10.0)
        _check(self.later_inputs in LATER_INPUTS,
               f"distill.later_inputs must be one of {', '.join(LATER_INPUTS)}, got {self.later_inputs!r}")
        _check(list(self.rollout_at) == sorted(set(self.rollout_at)) and all(s >= 1 for s in self.rollout_at),
               f"distill.rollout_at must be distinct, ascending optimizer steps >= 1, got {list(self.rollout_at)}")
        _range("distill.rollout_episodes", self.rollout_episodes, 1, 100_000)
        _range("distill.rollout_calls", self.rollout_calls, 1, len(self.timesteps), "len(distill.timesteps)")
        _range("distill.rollout_fraction", self.rollout_fraction, 0.0, 1.0)
        _range("distill.energy_weight", self.energy_weight, 0.0, 100.0)
        _range("distill.energy_rows", self.energy_rows, 1, 100_000)
        _range("distill.energy_samples", self.energy_samples, 2, 64)
        _range("distill.energy_from", self.energy_from, 0, 10_000_000)
        _range("distill.later_inputs_from", self.later_inputs_from, 0, 10_000_000)
        last = self.rollout_seed_start + len(self.rollout_at) * self.rollout_episodes
        _check(self.rollout_seed_start >= 0 and last <= ROLLOUT_SEED_END,
               f"distill.rollout_seed_start + len(rollout_at) * rollout_episodes = {last} must lie in "
               f"[0, {ROLLOUT_SEED_END}]: the rollouts never start from the test seeds ({ROLLOUT_SEED_END} on)")


@dataclass
class Config:
    name: str = "custom"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> "Config":
        # The name is the default run folder (runs/<name>): a plain folder name.
        _check(isinstance(self.name, str) and self.name not in ("", ".", "..") and not set(self.name) & set("/\\\0"),
               f"name must be a plain folder name, got {self.name!r}")
        self.policy.validate()
        self.data.validate()
        self.train.validate()
        self.distill.validate()
        if self.distill.teacher is not None:
            T = self.policy.num_train_timesteps
            _check(self.distill.timesteps[0] < T and self.distill.teacher_ddim_steps <= T,
                   f"distill.timesteps {list(self.distill.timesteps)} and distill.teacher_ddim_steps="
                   f"{self.distill.teacher_ddim_steps} must lie below the teacher's num_train_timesteps={T}")
            _check(tuple(self.policy.fewstep_timesteps or ()) == tuple(self.distill.timesteps),
                   "a distillation's policy.fewstep_timesteps must be distill.timesteps (dpkit-distill sets both)")
            _check(self.policy.fewstep_later_epsilon == self.distill.later_epsilon,
                   "a distillation's policy.fewstep_later_epsilon must be distill.later_epsilon (dpkit-distill sets both)")
            if self.distill.rollout_at:
                _check(self.policy.obs_mode == "lowdim",
                       "distill.rollout_at: rollouts collect low-dim observation windows; this policy observes "
                       f"{self.policy.obs_mode!r} (leave rollout_at empty)")
                off = off_chain(self.distill, T)
                _check(not off, f"distill.rollout_at: rollout windows take their inputs from the teacher's chain, "
                                f"and timesteps {off} are not on it (from {self.distill.timesteps[0]} in steps of "
                                f"num_train_timesteps {T} // teacher_ddim_steps {self.distill.teacher_ddim_steps})")
        # Each evaluation sampler must be one the policy can run, or training would stop at the first evaluation.
        for label in self.train.eval_samplers:
            kind, k = parse_sampler_label(label)
            fewstep = self.policy.fewstep_timesteps
            if fewstep:
                _check(kind == "fewstep" and k <= len(fewstep),
                       f"train.eval_samplers entry {label!r}: a few-step student samples with fewstep-1 .. "
                       f"fewstep-{len(fewstep)}")
            else:
                _check(kind != "fewstep", f"train.eval_samplers entry {label!r}: fewstep is a distilled student's "
                                          f"sampler (dpkit-distill); this policy samples with ddpm or ddim")
                _check(k <= self.policy.num_train_timesteps,
                       f"train.eval_samplers entry {label!r}: {kind} takes at most policy.num_train_timesteps="
                       f"{self.policy.num_train_timesteps} steps")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], text: bool = False) -> "Config":
        """The config `d` describes (a state.json's "config", a converted policy's), validated. Its values
        must have their JSON types (an integer is not "16" or 16.0); `text=True`: some were parsed from text
        (key=value overrides, see `_coerce`)."""
        cfg = cls()
        _apply(cfg, d, prefix="", text=text)
        return cfg.validate()


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise DpkitError(f"bad config: {msg}")


def _range(key: str, value: int, lo: int, hi: int, hi_name: str | None = None) -> None:
    if not lo <= value <= hi:
        raise DpkitError(f"bad config: {key} must be in [{lo}, {hi_name or hi}], got {value}")


def _check_types(section: Any, prefix: str) -> None:
    """Each field of `section` has its declared type (what YAML and overrides get from `_coerce`; this also
    holds for a config built in Python). Numbers written as another numeric type are converted in place."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        setattr(section, f.name, _coerce(getattr(section, f.name), hints[f.name], f"{prefix}.{f.name}"))


def resnet_groups(channels: int) -> int:
    """GroupNorm groups of a ResNet stage with `channels` channels (the rule of `vision._norm`)."""
    return max(1, channels // 16)


def _coerce(value: Any, tp: Any, key: str, text: bool = True) -> Any:
    """Convert a value to the field's declared type (`int | None`, `tuple[int, ...]`, ...).

    `text`: the value was written as text (a YAML file, a key=value override, a config built in Python), so
    a number may arrive as a string (YAML 1.1 reads "3e-4" as one) and an integer as a whole float. Otherwise
    (JSON: state.json, a converted policy's config) each value must have its JSON type: an integer field takes
    an integer (not a bool, a float or a string), a number field a number."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, text)
        raise DpkitError(f"bad config: {key} has an unsupported type {tp}")  # not used by any field
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise DpkitError(f"bad config: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", text) for i, v in enumerate(value))
        if len(value) != len(args):
            raise DpkitError(f"bad config: {key} must be a list of {len(args)}, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", text) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise DpkitError(f"bad config: {key} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if not text:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if tp is int else numbers.Real):
                what = "an integer" if tp is int else "a number"
                raise DpkitError(f"bad config: {key} must be {what}, got {_json_text(value)} "
                                 f"({type(value).__name__})")
            value = int(value) if tp is int else float(value)
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
        if not math.isfinite(value):
            raise DpkitError(f"bad config: {key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DpkitError(f"bad config: {key} expects a string, got {value!r}")
        return value
    raise DpkitError(f"bad config: {key} has an unsupported type {tp}")


def _json_text(value: Any) -> str:
    """`value` as JSON writes it ("16" with its quotes, 16.0, true), for messages about JSON files."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _apply(obj: Any, d: dict[str, Any], prefix: str, text: bool = True) -> None:
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
            _apply(current, value, prefix=f"{full}.", text=text)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, text))


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
    except RecursionError:  # the YAML parser recurses once per nesting level
        raise DpkitError(f"override {key}=... nests its value too deeply to read") from None
    return key.split("."), value


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a named config (`tiny`, `pusht_lowdim`, `pusht_lowdim_cpu`, `pusht_image`) or a YAML path, then apply overrides.

    A config may start from another (`base: NAME`: a named config, or a YAML path taken from the file's own
    folder): the base's values first, then its own, so a variant states only what it changes."""
    path = _config_path(name_or_path)
    cfg = Config(name=path.stem)
    chain = [path]
    raw = _read_config(path)
    layers = [raw]
    while "base" in raw:
        base = raw.pop("base")
        if not isinstance(base, str) or not base:
            raise DpkitError(f"config {chain[-1]}: base must name a config, got {base!r}")
        path = _config_path(base, relative_to=chain[-1].parent)
        if path in chain:
            raise DpkitError(f"config {chain[0]}: its bases form a loop ({' -> '.join(p.stem for p in chain + [path])})")
        chain.append(path)
        raw = _read_config(path)
        layers.append(raw)
    for layer in reversed(layers):
        _apply(cfg, layer, prefix="")
    for text in overrides:
        keys, value = parse_override(text)
        nested: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            nested = {k: nested}
        _apply(cfg, nested, prefix="")
    return cfg.validate()


def _config_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A named config's file, or a YAML path (a base's relative path is taken from the file naming it)."""
    path = Path(name_or_path)
    if path.suffix and relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise DpkitError(f"config {name_or_path!r} not found (named configs: {known}; or give a YAML path)")
    return path.resolve()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DpkitError(f"config {path} is not valid YAML: {e}") from None
    except RecursionError:  # the YAML parser recurses once per nesting level
        raise DpkitError(f"config {path} nests too deeply to read (a dpkit config is a few levels deep)") from None
    if not isinstance(raw, dict):
        raise DpkitError(f"bad config: {path}'s top level must be a mapping, got {type(raw).__name__}")
    return raw
