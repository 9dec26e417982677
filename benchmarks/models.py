"""Random-weight models for benchmarks: a checkpoint and a bundle per config, built once and cached.

    from dpkit.benchmarks.models import prepare_model, random_obs
    model = prepare_model("tiny", Path("benchmarks/.cache"))
    obs = random_obs(model, batch=4)

Latency does not depend on training, so every config is measured with random weights; the cache key
covers the config, dpkit's version and a hash of the exporter's source (a changed exporter never times a
stale bundle). The bundle comes from the export stage, the only writer of bundles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import dpkit
from dpkit.errors import DpkitError
from dpkit.runtime.parity import random_observations

SEED = 0

@dataclass
class ModelArtifacts:
    name: str
    checkpoint: Path
    bundle: Path | None
    bundle_error: str | None
    params: int
    encoder_flops: int  # per sample
    denoiser_flops: int  # per sample, one call
    obs_spec: list[dict[str, Any]]
    n_obs_steps: int
    horizon: int
    action_dim: int

    def chunk_flops(self, batch: int, steps: int) -> int:
        return batch * (self.encoder_flops + steps * self.denoiser_flops)


def synthetic_normalizer(policy_cfg):
    """Min-max statistics spanning the PushT table: actions, agent position and keypoints in [0, 512] px."""
    from dpkit.train.config import LOWDIM_OBS_DIM
    from dpkit.train.normalizer import Normalizer

    def span(dim: int) -> np.ndarray:
        return np.array([[0.0] * dim, [512.0] * dim])

    data = {"action": span(policy_cfg.action_dim)}
    if policy_cfg.obs_mode == "image":
        data["agent_pos"] = span(2)
    else:
        data["obs"] = span(LOWDIM_OBS_DIM)
    return Normalizer.fit(data)


def count_flops(policy) -> tuple[int, int]:
    """(encoder FLOPs, one denoiser call's FLOPs) per sample, counted at batch 1 (both are linear in batch)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = policy.cfg
    obs = policy.example_obs(1)
    with torch.no_grad():
        with FlopCounterMode(display=False) as enc:
            cond = policy.encoder(*[obs[k] for k in policy.obs_keys])
        x = torch.zeros(1, cfg.horizon, cfg.action_dim)
        t = torch.zeros(1, dtype=torch.int64)
        with FlopCounterMode(display=False) as den:
            policy.denoiser(x, t, cond)
    return int(enc.get_total_flops()), int(den.get_total_flops())


def _export_bundle(checkpoint: Path, out: Path, log: Callable[[str], None]) -> None:
    """Export (and parity-verify) through the export stage, the only writer of bundles."""
    try:
        from dpkit.export.writer import export_bundle
    except ImportError as e:
        raise DpkitError(f"the export stage is not importable ({e})") from None
    lines: list[str] = []
    try:
        export_bundle(checkpoint, out, force=True, log=lines.append)
    except DpkitError:
        for line in lines:  # its parity table explains a failure
            log(line)
        raise


def _exporter_digest() -> str:
    """Hash of the export stage's source: a changed exporter makes new cached bundles, never stale ones."""
    import dpkit.export

    h = hashlib.sha256()
    for f in sorted(Path(dpkit.export.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def prepare_model(name: str, cache_dir: Path, log: Callable[[str], None] = print,
                  need_bundle: bool = True) -> ModelArtifacts:
    """Checkpoint + bundle of config `name` with random weights, built once per config in `cache_dir`.

    A bundle that fails to export is recorded (the torch backend still runs); the "ort"/"cpp" rows of
    that model are then skipped with the reason. `need_bundle=False` (torch rows only) skips the export.
    """
    import torch

    from dpkit.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
    from dpkit.train.config import load_config
    from dpkit.train.policy import DiffusionPolicy

    cfg = load_config(name)
    key = hashlib.sha256(json.dumps([cfg.to_dict(), dpkit.__version__, SEED, _exporter_digest()],
                                    sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir / f"{name}-{key}"
    run_dir, bundle_dir = root / "run", root / "bundle"
    try:
        ckpt = resolve_checkpoint(run_dir)
        policy, _ = load_checkpoint(ckpt)
    except DpkitError:
        log(f"[{name}] building a random-weight checkpoint in {run_dir}")
        torch.manual_seed(SEED)
        policy = DiffusionPolicy(cfg.policy, synthetic_normalizer(cfg.policy)).eval()
        state = {"config": cfg.to_dict(), "normalizer": policy.normalizer.to_dict(), "epoch": 0,
                 "note": "random weights for dpkit-bench"}
        ckpt = save_checkpoint(run_dir, 0, model=policy, ema_model=policy, state=state, keep=1)
    bundle_error = None if need_bundle else "not needed (no bundle backend requested)"
    if need_bundle and not (bundle_dir / "policy.json").is_file():
        log(f"[{name}] exporting the bundle to {bundle_dir}")
        try:
            _export_bundle(ckpt, bundle_dir, log)
        except DpkitError as e:
            bundle_error = f"export failed: {e}"
        except Exception as e:  # an export bug must not take the torch rows down with it
            bundle_error = f"export failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    enc_flops, den_flops = count_flops(policy)
    return ModelArtifacts(
        name=name, checkpoint=Path(ckpt), bundle=None if bundle_error else bundle_dir, bundle_error=bundle_error,
        params=policy.num_parameters(), encoder_flops=enc_flops, denoiser_flops=den_flops,
        obs_spec=policy.observation_spec(), n_obs_steps=cfg.policy.n_obs_steps, horizon=cfg.policy.horizon,
        action_dim=cfg.policy.action_dim,
    )


def random_obs(model: ModelArtifacts, batch: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Observations in the environment's ranges (images in [0, 1], positions in pixels)."""
    return random_observations(model.obs_spec, model.n_obs_steps, batch, seed)
