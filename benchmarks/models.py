"""Random-weight models for benchmarks: a checkpoint and a bundle per config, built once and cached.

    from dpkit.benchmarks.models import prepare_model, random_obs
    model = prepare_model("tiny", Path("benchmarks/.cache"))
    obs = random_obs(model, batch=4)
    student = prepare_model("tiny", Path("benchmarks/.cache"), fewstep=True, precisions=("fp32", "int8"))

Latency does not depend on training, so every config is measured with random weights; the cache key
covers the config, dpkit's version and a hash of the exporter's source (a changed exporter never times a
stale bundle). The bundle comes from the export stage, the only writer of bundles.

`fewstep=True` builds the same network as a few-step student (FEWSTEP_TIMESTEPS, the fields dpkit-distill
sets: policy.fewstep_timesteps, prediction_type "sample", default_sampler "fewstep"), so its bundle lists
fewstep-1 and fewstep-2; timing does not need a distilled student, only its network and its sampler.
`precisions` also exports an int8 bundle (`bundle-int8` beside `bundle`, as bench_precision does).
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
FEWSTEP_TIMESTEPS = (99, 49)
"""The bench student's timesteps: dpkit-distill's default (distill.timesteps), so fewstep-1 and fewstep-2."""
PRECISIONS = ("fp32", "int8")

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
    fewstep_timesteps: tuple[int, ...] | None = None
    """Set: this is the few-step student of config `name` (same network; samples only with fewstep-k)."""
    bundles: dict[str, Path | None] | None = None
    """precision -> bundle (None: failed, see bundle_errors); fp32 is `bundle`."""
    bundle_errors: dict[str, str] | None = None

    @property
    def student(self) -> bool:
        return bool(self.fewstep_timesteps)

    def bundle_for(self, precision: str = "fp32") -> tuple[Path | None, str | None]:
        """(bundle, None) of one precision, or (None, why there is none)."""
        if precision == "fp32":
            return self.bundle, self.bundle_error
        if self.bundles is None or precision not in self.bundles:
            return None, f"no {precision} bundle was prepared"
        return self.bundles[precision], (self.bundle_errors or {}).get(precision)

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


def fewstep_student_config(cfg):
    """Config `cfg` made a few-step student the way dpkit-distill makes one (dpkit.train.distill's
    STUDENT_FIELDS): the same network, FEWSTEP_TIMESTEPS, prediction_type "sample", default_sampler
    "fewstep"; evaluation samplers (unused here) become the student's."""
    import dataclasses

    from dpkit.train.config import DistillConfig
    from dpkit.train.distill import student_policy

    policy = student_policy(cfg.policy, DistillConfig(timesteps=FEWSTEP_TIMESTEPS))
    train = dataclasses.replace(cfg.train, eval_samplers=tuple(
        f"fewstep-{k}" for k in range(1, len(FEWSTEP_TIMESTEPS) + 1)) if cfg.train.eval_samplers else ())
    return dataclasses.replace(cfg, policy=policy, train=train).validate()


def _export_bundle(checkpoint: Path, out: Path, log: Callable[[str], None], precision: str = "fp32") -> None:
    """Export (and parity-verify) through the export stage, the only writer of bundles."""
    try:
        from dpkit.export.writer import export_bundle
    except ImportError as e:
        raise DpkitError(f"the export stage is not importable ({e})") from None
    lines: list[str] = []
    try:
        export_bundle(checkpoint, out, force=True, log=lines.append,
                      **({} if precision == "fp32" else {"precision": precision}))
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


def _try_export(ckpt: Path, out: Path, log: Callable[[str], None], precision: str = "fp32") -> str | None:
    """Export unless `out` holds a bundle already; None, or why the export failed."""
    if (out / "policy.json").is_file():
        return None
    log(f"exporting the {precision} bundle to {out}")
    try:
        _export_bundle(ckpt, out, log, precision)
    except DpkitError as e:
        return f"export failed: {e}"
    except Exception as e:  # an export bug must not take the torch rows down with it
        return f"export failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def prepare_model(name: str, cache_dir: Path, log: Callable[[str], None] = print,
                  need_bundle: bool = True, *, fewstep: bool = False,
                  precisions: tuple[str, ...] = ("fp32",)) -> ModelArtifacts:
    """Checkpoint + bundle of config `name` with random weights, built once per config in `cache_dir`
    (`fewstep`: the config's few-step student; `precisions`: also those bundles, e.g. int8).

    A bundle that fails to export is recorded (the torch backend still runs); the "ort"/"cpp" rows of
    that model are then skipped with the reason. `need_bundle=False` (torch rows only) skips the export.
    """
    import torch

    from dpkit.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
    from dpkit.train.config import load_config
    from dpkit.train.policy import DiffusionPolicy

    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise DpkitError(f"unknown precision {bad[0]!r} (choose from: {', '.join(PRECISIONS)})")
    cfg = load_config(name)
    if fewstep:
        cfg = fewstep_student_config(cfg)
    key = hashlib.sha256(json.dumps([cfg.to_dict(), dpkit.__version__, SEED, _exporter_digest()],
                                    sort_keys=True).encode()).hexdigest()[:12]
    label = f"{name}-fewstep" if fewstep else name
    root = cache_dir / f"{label}-{key}"
    run_dir, bundle_dir = root / "run", root / "bundle"
    try:
        ckpt = resolve_checkpoint(run_dir)
        policy, _ = load_checkpoint(ckpt)
    except DpkitError:
        log(f"[{label}] building a random-weight checkpoint in {run_dir}")
        torch.manual_seed(SEED)
        policy = DiffusionPolicy(cfg.policy, synthetic_normalizer(cfg.policy)).eval()
        state = {"config": cfg.to_dict(), "normalizer": policy.normalizer.to_dict(), "epoch": 0,
                 "note": "random weights for dpkit-bench"}
        ckpt = save_checkpoint(run_dir, 0, model=policy, ema_model=policy, state=state, keep=1)
    tagged = lambda line: log(f"[{label}] {line}")  # noqa: E731
    bundle_error = _try_export(ckpt, bundle_dir, tagged) if need_bundle else "not needed (no bundle backend requested)"
    bundles: dict[str, Path | None] = {"fp32": None if bundle_error else bundle_dir}
    bundle_errors: dict[str, str] = {"fp32": bundle_error} if bundle_error else {}
    for precision in precisions:
        if precision == "fp32":
            continue
        out = root / f"bundle-{precision}"
        err = _try_export(ckpt, out, tagged, precision) if need_bundle else "not needed (no bundle backend requested)"
        bundles[precision] = None if err else out
        if err:
            bundle_errors[precision] = err
    enc_flops, den_flops = count_flops(policy)
    return ModelArtifacts(
        name=name, checkpoint=Path(ckpt), bundle=None if bundle_error else bundle_dir, bundle_error=bundle_error,
        params=policy.num_parameters(), encoder_flops=enc_flops, denoiser_flops=den_flops,
        obs_spec=policy.observation_spec(), n_obs_steps=cfg.policy.n_obs_steps, horizon=cfg.policy.horizon,
        action_dim=cfg.policy.action_dim,
        fewstep_timesteps=tuple(cfg.policy.fewstep_timesteps) if cfg.policy.fewstep_timesteps else None,
        bundles=bundles, bundle_errors=bundle_errors,
    )


def random_obs(model: ModelArtifacts, batch: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Observations in the environment's ranges (images in [0, 1], positions in pixels)."""
    return random_observations(model.obs_spec, model.n_obs_steps, batch, seed)
