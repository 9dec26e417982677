"""Write a converted policy as a normal dpkit run folder (what dpkit-train writes, minus optimizer state).

    write_run("runs/lerobot_pusht", config, normalizer, weights, source, step=0, force=False)

The run is built in a temp folder beside `out` and renamed into place only when the model was rebuilt
from it; on any error nothing is left at `out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpkit.errors import DpkitError
from dpkit.io import atomic_dir
from dpkit.train.checkpoint import load_checkpoint, save_checkpoint
from dpkit.train.config import Config
from dpkit.train.normalizer import Normalizer
from dpkit.train.policy import DiffusionPolicy

from dpkit.convert.mapping import load_mapped


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing --out unless --force and it is a dpkit run folder (or empty): a mistyped --out
    must not replace a dataset or a bundle."""
    if not out.exists():
        return
    if not force:
        raise DpkitError(f"{out} already exists (use --force to replace it)")
    if not out.is_dir() or not ((out / "checkpoints").is_dir() or not any(out.iterdir())):
        raise DpkitError(f"--force replaces only a dpkit run folder; {out} is not one")


def write_run(out: str | Path, config: Config, normalizer: Normalizer, weights: dict[str, Any],
              source: dict[str, Any], *, step: int = 0, force: bool = False) -> Path:
    """Build dpkit's model from `config`, load `weights` (dpkit names) strictly, save it as run `out`."""
    out = Path(out)
    check_out(out, force)
    config.validate()
    policy = DiffusionPolicy(config.policy, normalizer)
    load_mapped(policy, weights, source.get("path", "source"))
    state = {"config": config.to_dict(), "normalizer": normalizer.to_dict(), "epoch": 0, "source": source}
    with atomic_dir(out, force=force) as tmp:
        save_checkpoint(tmp, step, model=policy, ema_model=None, state=state, keep=1)
        load_checkpoint(tmp)  # the run reads back as every dpkit tool will read it
    return out
