"""Training checkpoints: safetensors weights + JSON state, written atomically; loading for later stages.

    from dpkit.train.checkpoint import load_checkpoint
    policy, state = load_checkpoint("runs/tiny")          # run folder -> its latest checkpoint, EMA weights
    policy, state = load_checkpoint("runs/tiny/checkpoints/step_003000", ema=False)

A checkpoint is a folder `RUN_DIR/checkpoints/step_NNNNNN/`:
  model.safetensors   "model.<name>" (trained weights) and "ema.<name>" (EMA weights) tensors
  state.json          config, normalizer, counters (step, epoch), metrics, dpkit version
  trainer_state.pt    optimizer and LR-scheduler state dicts (plain tensors; loaded with weights_only)
The folder is built under a temp name and renamed into place; `checkpoints/latest` (a one-line text
file, replaced atomically) names the newest complete one. No pickled objects anywhere.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dpkit
from dpkit.errors import DpkitError, InputError
from dpkit.io import atomic_dir, atomic_write_json, atomic_write_text
from dpkit.io import MAX_JSON_DEPTH, json_depth

FORMAT = "dpkit-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "state.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
BEST = "best"
_STEP_DIR = re.compile(r"^step_(\d+)$")

if TYPE_CHECKING:  # torch is imported where tensors are touched, so reading state.json stays fast
    import torch


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Complete-looking `step_*` folders of a run, oldest first (temp folders start with '.')."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names, else the highest step folder, else None."""
    d = checkpoints_dir(run_dir)
    pointer = d / LATEST
    if pointer.is_file():
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()  # a garbled pointer is ignored
        if name and _STEP_DIR.match(name) and (d / name).is_dir():
            return d / name
    dirs = step_dirs(run_dir)
    return dirs[-1] if dirs else None


def check_run_dir(run_dir: str | Path, resume: bool, force: bool) -> Path | None:
    """The checkpoint a training run into `run_dir` resumes from (None for a fresh run); refuse to mix runs."""
    existing = latest_checkpoint(run_dir)
    if resume:
        if existing is None:
            raise DpkitError(f"--resume: no checkpoint in {run_dir}/checkpoints to continue from")
        return existing
    if existing is not None and not force:
        raise DpkitError(f"{run_dir} already holds checkpoints; pass --resume to continue or --force to start over")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (or its checkpoints/ folder) -> its latest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise DpkitError(f"checkpoint {p} does not exist")
    if (p / STATE).is_file() or (p / WEIGHTS).is_file():
        return p
    run_dir = p.parent if p.name == "checkpoints" else p
    found = latest_checkpoint(run_dir)
    if found is None:
        raise DpkitError(f"{p} holds no checkpoint (expected {STATE} or checkpoints/step_*/ inside)")
    return found


def _tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors that share storage, and the copy must not alias live weights.
    return {f"{prefix}.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema_model: torch.nn.Module | None,
    state: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
    keep: int = 3,
    name: str | None = None,
) -> Path:
    """Write `checkpoints/<name or step_NNNNNN>/` atomically, point `latest` at it, prune old ones."""
    import torch
    from safetensors.torch import save_file

    d = checkpoints_dir(run_dir)
    name = name or f"step_{step:06d}"
    tensors = _tensors("model", model)
    if ema_model is not None:
        tensors.update(_tensors("ema", ema_model))
    full_state = {"format": FORMAT, "format_version": FORMAT_VERSION, "dpkit_version": dpkit.__version__, "step": step}
    full_state.update(state)
    with atomic_dir(d / name, force=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "step": str(step)})
        atomic_write_json(tmp / STATE, full_state)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
    if _STEP_DIR.match(name):
        atomic_write_text(d / LATEST, name + "\n")
        for old in step_dirs(run_dir)[:-keep] if keep > 0 else []:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return d / name


def copy_checkpoint(src: str | Path, run_dir: str | Path, name: str) -> Path:
    """Copy a checkpoint folder to `checkpoints/<name>` (e.g. "best"), replacing it atomically."""
    dst = checkpoints_dir(run_dir) / name
    with atomic_dir(dst, force=True) as tmp:
        for f in Path(src).iterdir():
            shutil.copy2(f, tmp / f.name)
    return dst


def read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE
    if not path.is_file():
        raise DpkitError(f"checkpoint file {path} is missing")
    try:
        text = path.read_text()
        if json_depth(text) > MAX_JSON_DEPTH:  # checked before parsing, which recurses
            raise InputError(f"checkpoint file {path}: JSON nesting is deeper than {MAX_JSON_DEPTH} levels; refused")
        state = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DpkitError(f"checkpoint file {path} is corrupt or truncated ({e})") from None
    except OSError as e:
        raise DpkitError(f"cannot read checkpoint file {path}: {e.strerror}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DpkitError(f"{path} is not a dpkit checkpoint state (no format: {FORMAT!r})")
    if not isinstance(state.get("format_version", 0), int):
        raise DpkitError(f"{path}: format_version must be an integer, got {state['format_version']!r}")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise DpkitError(f"{path} has format_version {state['format_version']}; this dpkit reads <= {FORMAT_VERSION}")
    for key in ("config", "normalizer", "step"):
        if key not in state:
            raise DpkitError(f"checkpoint file {path} lacks {key!r}")
    for key in ("config", "normalizer"):
        if not isinstance(state[key], dict):
            raise DpkitError(f"checkpoint file {path}: {key!r} must be an object, got {_kind(state[key])}")
    # Counters the trainer resumes from and the exporter records: whole numbers in range.
    for key, lo in (("step", 0), ("epoch", 0), ("ema_updates", 0), ("world_size", 1)):
        if key in state and not (_is_int(state[key]) and state[key] >= lo):
            raise DpkitError(f"checkpoint file {path}: {key!r} must be an integer >= {lo}, got {state[key]!r}")
    m = _STEP_DIR.match(ckpt.name)
    if m and int(m.group(1)) != state["step"]:
        raise DpkitError(f"checkpoint file {path} says step {state['step']} but its folder is {ckpt.name}")
    best = state.get("best_score")
    if best is not None and not (isinstance(best, (int, float)) and not isinstance(best, bool) and math.isfinite(best)):
        raise DpkitError(f"checkpoint file {path}: 'best_score' must be a number or null, got {best!r}")
    return state


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), type(v).__name__)


def read_weights(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The `prefix.` tensors of model.safetensors, with the prefix stripped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ckpt / WEIGHTS
    if not path.is_file():
        raise DpkitError(f"checkpoint file {path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DpkitError(f"checkpoint file {path} is corrupt or truncated ({e})") from None
    out = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if not out:
        raise DpkitError(f"checkpoint file {path} has no {prefix!r} weights")
    return out


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.pt's {"optimizer": ..., "scheduler": ...} state dicts, checked for their shape (not yet
    against a model: `load_trainer_state` does that)."""
    import torch

    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise DpkitError(f"checkpoint file {path} is missing (cannot resume the optimizer)")
    try:
        ts = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError for damaged files
        raise DpkitError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__})") from None
    bad = f"checkpoint file {path} is not a dpkit trainer state:"
    if not isinstance(ts, dict):
        raise DpkitError(f"{bad} expected a dict of optimizer and scheduler states, got {type(ts).__name__}")
    missing = [k for k in ("optimizer", "scheduler") if not isinstance(ts.get(k), dict)]
    if missing:
        raise DpkitError(f"{bad} {' and '.join(repr(k) for k in missing)} missing or not a dict")
    opt, sched = ts["optimizer"], ts["scheduler"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"]
    ):
        raise DpkitError(f"{bad} 'optimizer' lacks its 'state' dict or 'param_groups' list")
    if not _is_int(sched.get("last_epoch")) or sched["last_epoch"] < 0:
        raise DpkitError(f"{bad} 'scheduler' lacks a step counter ('last_epoch')")
    return ts


def load_trainer_state(ckpt: Path, state: dict[str, Any], optimizer, scheduler) -> None:
    """Restore the optimizer and LR scheduler of a resumed run, refusing a trainer_state.pt that does not
    belong to this model or to the step state.json names (it would fail, or train wrongly, later)."""
    import torch

    path = ckpt / TRAINER_STATE
    ts = read_trainer_state(ckpt)
    if ts["scheduler"]["last_epoch"] != state["step"]:
        raise DpkitError(f"checkpoint file {path} is from step {ts['scheduler']['last_epoch']}, "
                         f"but {STATE} says step {state['step']}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DpkitError(f"checkpoint file {path} does not match this run's model and optimizer ({first})") from None
    # load_state_dict checks group sizes but not tensor shapes: a mismatch would fail at the first step.
    for i, p in enumerate(params):
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                raise DpkitError(f"checkpoint file {path}: optimizer state {k!r} of parameter {i} has shape "
                                 f"{tuple(v.shape)}, the model's is {tuple(p.shape)}")


# Optimizer settings a resumed run cannot change: the optimizer's saved state carries them.
_OPTIMIZER_FIELDS = ("lr", "betas", "weight_decay")


def check_resume_config(ckpt: Path, state: dict[str, Any], cfg: Any) -> None:
    """Refuse settings a resume would silently ignore (the optimizer state restores lr, betas, weight_decay)
    or silently change (GroupNorm group counts, which the weights' shapes do not show)."""
    saved = state["config"].get("train", {})
    for key in _OPTIMIZER_FIELDS:
        new, old = getattr(cfg.train, key), saved.get(key)
        if old is not None and (list(new) if isinstance(new, tuple) else new) != old:
            raise DpkitError(f"--resume cannot change train.{key} (checkpoint {ckpt.name}: {old}, asked: "
                             f"{list(new) if isinstance(new, tuple) else new}): its optimizer state carries it; "
                             f"start a new run instead")
    # GroupNorm group counts are not in the tensors' shapes: a changed one would load and train on silently.
    # A checkpoint without final_norm_groups built its final block with n_groups.
    policy = state["config"].get("policy", {})
    saved_groups = {"n_groups": policy.get("n_groups"),
                    "final_norm_groups": policy.get("final_norm_groups") or policy.get("n_groups")}
    asked = {"n_groups": cfg.policy.n_groups, "final_norm_groups": cfg.policy.final_norm_groups or cfg.policy.n_groups}
    for key, old in saved_groups.items():
        if old is not None and old != asked[key]:
            raise DpkitError(f"--resume cannot change policy.{key} (checkpoint {ckpt.name}: {old} groups, asked: "
                             f"{asked[key]}): GroupNorm groups are not in the weights' shapes; set "
                             f"policy.{key}={old} to continue this run")


def load_weights_into(module: torch.nn.Module, ckpt: Path, prefix: str) -> None:
    try:
        module.load_state_dict(read_weights(ckpt, prefix), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DpkitError(f"checkpoint {ckpt / WEIGHTS} does not match its config's model ({first})") from None


def load_checkpoint(path: str | Path, ema: bool = True, device: str | torch.device = "cpu"):
    """(DiffusionPolicy in eval mode, state dict from state.json) from a checkpoint or run folder.

    `ema=True` loads the EMA weights (what the paper evaluates) when the run kept them
    (train.ema), else the trained weights; `state["weights"]` says which.
    """
    from dpkit.train.config import Config
    from dpkit.train.normalizer import Normalizer
    from dpkit.train.policy import DiffusionPolicy

    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)  # trainer_state.pt (optimizer) is not read: a policy does not need it
    try:
        cfg = Config.from_dict(state["config"])
    except DpkitError as e:
        raise DpkitError(f"checkpoint file {ckpt / STATE}: {e}") from None
    normalizer = Normalizer.from_dict(state["normalizer"])
    policy = DiffusionPolicy(cfg.policy, normalizer)
    prefix = "ema" if ema and cfg.train.ema else "model"
    load_weights_into(policy, ckpt, prefix)
    state["weights"] = prefix
    policy.to(device).eval()
    state["checkpoint_path"] = str(ckpt)
    return policy, state
