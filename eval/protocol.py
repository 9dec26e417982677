"""What every PushT evaluation mode shares: the policy interface, the checks and the report's protocol keys.

    from dpkit.eval.protocol import check_policy, env_count
    check_policy(policy)                                   # refuses a policy PushT cannot drive, by name
    n_envs = env_count(policy, episodes=50, n_envs=None)   # environments stepped together

dpkit.eval.evaluate (the original protocol, its CLI) and dpkit.eval.latency (the same protocol under
inference latency) both import this module and not each other's internals, so neither imports the other
back: evaluate runs latency as a mode, latency needs only what is here.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

import numpy as np

from dpkit.errors import DpkitError
from dpkit.eval import pusht

OBS_KEYS = {"image": ("image", "agent_pos"), "lowdim": ("obs",)}
"""The observations each mode gives a policy (bundle-format.md: the encoder's inputs)."""
MAX_ENVS = 50
"""Default cap on environments stepped together (the 50 test episodes fit in one batch)."""


class Policy(Protocol):
    """What evaluation needs from a policy: the runtime's backend interface (dpkit.runtime.backend).

    Every `dpkit.runtime.load_policy` backend and `RandomPolicy` provide it. The evaluation passes
    `sampler`, `steps` and a `seed` per chunk, so sampling noise and with it the result are reproducible.
    """

    backend: str
    obs_mode: str
    n_obs_steps: int
    n_action_steps: int
    obs_keys: Sequence[str]

    def predict_action(self, obs: dict[str, np.ndarray], sampler: str | None = None, steps: int | None = None, *,
                       seed: int | None = None) -> np.ndarray:
        """obs: {key: (B, To, ...)} float32 -> absolute targets (B, Ta, 2) in pixels."""
        ...


def check_policy(policy: Any) -> None:
    """Refuse a policy PushT cannot drive (missing attributes, another task's observations), by name."""
    for attr in ("obs_mode", "n_obs_steps", "n_action_steps", "obs_keys", "predict_action"):
        if not hasattr(policy, attr):
            raise DpkitError(f"policy {type(policy).__name__} has no {attr!r}; it cannot be evaluated")
    if policy.obs_mode not in OBS_KEYS:
        raise DpkitError(f"policy observation mode {policy.obs_mode!r} is not one PushT offers ({', '.join(OBS_KEYS)})")
    # Names from the policy's observation spec (a converted policy has its source's); PushT builds each.
    unknown = [k for k in policy.obs_keys if k not in pusht.OBS_NAMES or (k == "image" and policy.obs_mode != "image")]
    if unknown:
        gives = [k for k in pusht.OBS_NAMES if k != "image" or policy.obs_mode == "image"]
        raise DpkitError(f"policy inputs {list(policy.obs_keys)} do not match PushT's {policy.obs_mode} observations: "
                         f"{unknown[0]!r} is not one of {', '.join(gives)}")
    if int(policy.n_obs_steps) < 1 or int(policy.n_action_steps) < 1:
        raise DpkitError(f"policy needs n_obs_steps >= 1 and n_action_steps >= 1, has {policy.n_obs_steps}, "
                         f"{policy.n_action_steps}")


def check_blend(blend: Any, execution: str | None, latency_steps: int | None,
                names: tuple[str, str, str] = ("blend", "execution", "latency_steps")) -> None:
    """Refuse a `blend` that would be ignored: it weights the old trajectory's rows after the `d` inpainted ones,
    so it acts only with execution async-inpaint and d >= 1. `names`: how the caller spells the three."""
    if isinstance(blend, bool) or not isinstance(blend, (int, np.integer)) or blend < 0:
        raise DpkitError(f"{names[0]} must be >= 0, got {blend!r}")
    if blend and execution != "async-inpaint":
        how = f"{names[1]} {execution}" if execution else f"an evaluation without {names[2]}"
        raise DpkitError(f"{names[0]} {blend} would be ignored: it applies only to {names[1]} async-inpaint, "
                         f"not to {how}")
    if blend and not latency_steps:
        raise DpkitError(f"{names[0]} {blend} would be ignored: it follows the inpainted prefix, which needs "
                         f"{names[2]} >= 1, got {latency_steps or 0}")


def env_count(policy: Any, episodes: int, n_envs: int | None) -> int:
    """Environments stepped together: `n_envs` (default min(episodes, MAX_ENVS)), at most `episodes` and
    the policy's `max_batch` (a backend with preallocated buffers, cpp, takes that many per call)."""
    n = min(episodes, MAX_ENVS) if n_envs is None else min(int(n_envs), episodes)
    n = min(n, getattr(policy, "max_batch", None) or n)
    if n < 1:
        raise DpkitError(f"n_envs must be >= 1, got {n}")
    return n


def policy_fields(policy: Any, mode: str, n_obs_steps: int, n_action_steps: int,
                  latencies: Sequence[float]) -> dict[str, Any]:
    """The report keys that say which policy ran and what its chunks cost (shared by every evaluation mode)."""
    return {"backend": str(getattr(policy, "backend", type(policy).__name__)), "obs_mode": mode,
            "n_obs_steps": n_obs_steps, "n_action_steps": n_action_steps,
            "mean_chunk_latency_ms": float(np.mean(latencies) * 1e3), "n_chunks": len(latencies)}


def protocol_fields(episodes: int, seed_start: int, max_steps: int, n_envs: int, sample_seed: int,
                    t_start: float) -> dict[str, Any]:
    """The report keys that say which protocol ran (shared by every evaluation mode)."""
    return {"n_episodes": episodes, "seed_start": seed_start, "max_steps": max_steps, "n_envs": n_envs,
            "sample_seed": sample_seed, "wall_s": round(time.perf_counter() - t_start, 3)}
