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
import re
import shutil
from pathlib import Path
from typing import Any

import torch

import dpkit
from dpkit.errors import DpkitError
from dpkit.io import atomic_dir, atomic_write_json, atomic_write_text

FORMAT = "dpkit-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "state.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
BEST = "best"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DpkitError(f"checkpoint file {path} is corrupt or truncated ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DpkitError(f"{path} is not a dpkit checkpoint state (no format: {FORMAT!r})")
    if not isinstance(state.get("format_version", 0), int):
        raise DpkitError(f"{path}: format_version must be an integer, got {state['format_version']!r}")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise DpkitError(f"{path} has format_version {state['format_version']}; this dpkit reads <= {FORMAT_VERSION}")
    for key in ("config", "normalizer", "step"):
        if key not in state:
            raise DpkitError(f"checkpoint file {path} lacks {key!r}")
    return state


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
    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise DpkitError(f"checkpoint file {path} is missing (cannot resume the optimizer)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError for damaged files
        raise DpkitError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__})") from None


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
    state = read_state(ckpt)
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
