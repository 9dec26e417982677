"""Export-time verification: the bundle in ONNX Runtime (CPU) against the PyTorch policy.

    rows, parity = verify_bundle(policy, bundle_dir, samples)   # samples: dataset windows or None

Checks each graph on dataset samples (when available) and on random inputs at batch 1 and 8, then a
whole sampled trajectory (PyTorch `policy.sample` with diffusers vs the "ort" backend's numpy loop over
the bundle's schedule) for DDPM-100 and the default DDIM, with identical injected noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpkit.errors import DpkitError
from dpkit.runtime.ort_policy import OrtPolicy
from dpkit.runtime.parity import max_abs_error, trajectory_errors
from dpkit.runtime.torch_policy import TorchPolicy

FP32_TOLERANCE = 1e-4
# fp16 graphs are measured against the fp32 PyTorch model, so their error is fp16 rounding, not an
# export bug; this only catches a broken conversion (e.g. overflow).
FP16_TOLERANCE = 5e-2
BATCHES = (1, 8)
TRAJ_BATCH = 2


@dataclass
class ParityRow:
    check: str  # "encoder", "denoiser", and Schedule.trajectory_checks' ("traj_ddpm", "traj_ddim", "traj_fewstep")
    inputs: str  # "dataset" or "random"
    batch: int
    max_abs_err: float

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "inputs": self.inputs, "batch": self.batch, "max_abs_err": self.max_abs_err}


def dataset_samples(config: dict[str, Any], data_path: str | None, n: int = max(BATCHES)) -> tuple[dict | None, str]:
    """`n` training windows spread over the dataset: ({"obs": {...}, "action": ...}, description), or
    (None, why not) when the dataset cannot be found or read."""
    from dpkit.train.config import Config
    from dpkit.train.data import load_datasets

    try:
        cfg = Config.from_dict(config)
        if cfg.policy.obs_keys:  # a converted policy's own observation layout: the PushT dataset lacks it
            return None, f"random inputs only (the dataset holds no {', '.join(cfg.policy.obs_keys)} observations)"
        train, _ = load_datasets(cfg, data_path)
    except DpkitError as e:
        return None, f"random inputs only (dataset unavailable: {e})"
    idx = np.linspace(0, len(train) - 1, n).round().astype(np.int64)
    batch = train.__getitems__(idx)
    obs = batch["obs"] if isinstance(batch["obs"], dict) else {"obs": batch["obs"]}
    return {"obs": obs, "action": batch["action"]}, f"dataset {train.replay.path}"


def _graph_inputs(policy, samples: dict | None, batch: int, seed: int) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{"random"|"dataset": {"encoder": inputs, "denoiser": inputs}} as float32/int64 numpy arrays."""
    from dpkit.export.onnx_export import example_inputs

    rnd = example_inputs(policy, batch=batch, seed=seed)
    out = {"random": {g: {k: v.numpy() for k, v in d.items()} for g, d in rnd.items()}}
    if samples is not None:
        obs = {k: np.ascontiguousarray(v[:batch], dtype=np.float32) for k, v in samples["obs"].items()}
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            cond = policy.encoder(*[torch.from_numpy(obs[k]) for k in policy.obs_keys])
            x0 = policy.normalizer.normalize("action", torch.from_numpy(np.asarray(samples["action"][:batch], np.float32)))
            t = torch.randint(0, policy.cfg.num_train_timesteps, (batch,), generator=g)
            noisy = policy.noise_scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        out["dataset"] = {"encoder": obs, "denoiser": {"sample": noisy.numpy(), "timestep": t.numpy(), "cond": cond.numpy()}}
    return out


def verify_bundle(policy, bundle_dir: Path, samples: dict | None, seed: int = 0) -> tuple[list[ParityRow], dict[str, float]]:
    """Parity rows and the `parity` summary (max abs error per check) for the bundle in `bundle_dir`."""
    ort_policy = OrtPolicy(bundle_dir, spin=False)  # ORT's idle threads must not spin against torch's
    sessions = {"encoder": ort_policy.encoder, "denoiser": ort_policy.denoiser}
    modules = {"encoder": policy.encoder, "denoiser": policy.denoiser}
    outputs = {"encoder": "cond", "denoiser": "noise_pred"}
    rows: list[ParityRow] = []
    for batch in BATCHES:
        for kind, graphs in _graph_inputs(policy, samples, batch, seed + batch).items():
            for name in ("encoder", "denoiser"):
                feed = graphs[name]
                got = sessions[name].run([outputs[name]], feed)[0]
                with torch.no_grad():
                    ref = modules[name](*[torch.from_numpy(v) for v in feed.values()]).numpy()
                rows.append(ParityRow(name, kind, batch, max_abs_error(got, ref)))

    # Whole trajectories: identical injected noise, PyTorch (diffusers) vs ONNX graphs + numpy loop.
    torch_policy = TorchPolicy(policy=policy)
    if samples is not None:
        obs, kind = {k: np.asarray(v[:TRAJ_BATCH], np.float32) for k, v in samples["obs"].items()}, "dataset"
    else:
        obs = dict(_graph_inputs(policy, None, TRAJ_BATCH, seed)["random"]["encoder"])
        kind = "random"
    for check, spec in ort_policy.bundle.schedule.trajectory_checks():
        err = trajectory_errors(torch_policy, {"ort": ort_policy}, obs, spec.sampler, spec.num_inference_steps,
                                seed)["ort"]
        rows.append(ParityRow(check, kind, TRAJ_BATCH, err))

    parity = {}
    for r in rows:
        parity[r.check] = max(parity.get(r.check, 0.0), r.max_abs_err)
    return rows, parity


def format_table(rows: list[ParityRow], tolerance: float, title: str) -> str:
    lines = [title, f"  {'check':<10} {'inputs':<8} {'batch':>5}  {'max abs err':>11}  (bound {tolerance:g})"]
    for r in rows:
        flag = "" if r.max_abs_err <= tolerance else "  FAIL"
        lines.append(f"  {r.check:<10} {r.inputs:<8} {r.batch:>5}  {r.max_abs_err:>11.3e}{flag}")
    return "\n".join(lines)
