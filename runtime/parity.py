"""Observations to feed a policy, and the one "do these backends agree?" check.

    from dpkit.runtime.parity import random_observations, trajectory_errors
    obs = random_observations(policy.observations, policy.n_obs_steps, batch=2, seed=0)
    errs = trajectory_errors(reference, {"ort": ort, "cpp": cpp}, obs, "ddpm", 100)   # {"ort": 3e-7, ...}

Used by the exporter's verification (PyTorch vs the exported graphs), the benchmarks and the tests, so
"agree" means one thing everywhere: the same observations and the same injected noise (initial and every
step), the max absolute difference of the normalized trajectories.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from dpkit.errors import DpkitError


def random_observations(observations: Sequence[Mapping[str, Any]], n_obs_steps: int, batch: int,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """(batch, To, *shape) float32 per observation, in the environment's ranges: images in [0, 1], every
    other input (positions, keypoints) in [0, 512) pixels."""
    rng = np.random.default_rng(seed)
    out = {}
    for o in observations:
        high = 1.0 if o["name"] == "image" else 512.0
        out[o["name"]] = (rng.random((batch, n_obs_steps, *o["shape"])) * high).astype(np.float32)
    return out


def injected_noise(batch: int, horizon: int, action_dim: int, steps: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Initial (B, H, A) and per-step (K, B, H, A) standard normal noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, horizon, action_dim), dtype=np.float32)
    return x, rng.standard_normal((steps, batch, horizon, action_dim), dtype=np.float32)


def trajectory_errors(reference: Any, others: Mapping[str, Any], obs: dict[str, np.ndarray], sampler: str,
                      steps: int, seed: int = 0) -> dict[str, float]:
    """Max |traj - reference traj| per backend in `others`, all sampled with the same injected noise."""
    batch = next(iter(obs.values())).shape[0]
    x, noise = injected_noise(batch, reference.horizon, reference.action_dim, steps, seed)
    ref = reference.sample(obs, sampler, steps, initial_noise=x, step_noise=noise)
    return {name: max_abs_error(policy.sample(obs, sampler, steps, initial_noise=x, step_noise=noise), ref)
            for name, policy in others.items()}


def max_abs_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max absolute difference in float64; inf when either side is not finite. Shapes must match."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise DpkitError(f"parity check: output shape {got.shape} differs from the reference {want.shape}")
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    return err if np.isfinite(err) else float("inf")
