"""The `scheduler` object of policy.json, computed once with diffusers (the training scheduler's source).

Runtimes never recompute the schedule: they read these arrays. Each sampler entry is
`DiffusionPolicy.sampler_spec` (diffusers' own `set_timesteps` and step targets, or a student's few-step
timesteps), the chain the PyTorch policy itself runs, so every runtime walks exactly that chain.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from dpkit.errors import DpkitError

# DDIM step counts listed in every bundle (plus the config's own `ddim_steps`); the C++ runtime and the
# "ort" backend can only run listed ones. Steps that do not divide 100 are fine: diffusers' "leading"
# spacing gives them, and they are listed exactly as it does.
DEFAULT_DDIM_STEPS = (1, 2, 4, 5, 8, 10, 16, 20, 25, 50, 100)


def parse_steps(text: str) -> tuple[int, ...]:
    """`--ddim-steps 1,2,5,10` -> (1, 2, 5, 10)."""
    try:
        steps = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise DpkitError(f"--ddim-steps expects a comma-separated list of integers, got {text!r}") from None
    if not steps:
        raise DpkitError("--ddim-steps is empty")
    return steps


def build_scheduler(policy, ddim_steps: Iterable[int] = DEFAULT_DDIM_STEPS, ddpm_steps: Iterable[int] = ()) -> dict[str, Any]:
    """The `scheduler` manifest object for a DiffusionPolicy: arrays plus the table of listed samplers.

    Each entry is `policy.sampler_spec`, the chain `policy.sample` runs. A few-step student lists its
    fewstep-1..K only; a diffusion policy DDPM with num_train_timesteps steps, then with each
    count of `ddpm_steps` and the config's default DDPM count (descending), and DDIM with each count.
    """
    policy_cfg = policy.cfg
    n = policy_cfg.num_train_timesteps
    steps = sorted({int(k) for k in ddim_steps} | {int(policy_cfg.ddim_steps)})
    bad = [k for k in steps if not 1 <= k <= n]
    if bad:
        raise DpkitError(f"DDIM step counts {bad} are outside [1, {n}] (num_train_timesteps)")

    default_kind, default_k = policy_cfg.default_sampling
    # the default DDPM count (a converted source's num_inference_steps) is always listed, as ddim_steps is
    listed = {int(k) for k in ddpm_steps} | ({default_k} if default_kind == "ddpm" else set())
    ddpm_counts = sorted(listed - {n}, reverse=True)
    bad = [k for k in ddpm_counts if not 1 <= k <= n]
    if bad:
        raise DpkitError(f"DDPM step counts {bad} are outside [1, {n}] (num_train_timesteps)")

    if policy_cfg.fewstep_timesteps:  # a few-step student: its network is sampled only by the few-step rule
        listed_samplers = [("fewstep", k) for k in range(1, len(policy_cfg.fewstep_timesteps) + 1)]
    else:
        listed_samplers = [("ddpm", k) for k in [n] + ddpm_counts] + [("ddim", k) for k in steps]
    samplers = [dataclasses.asdict(policy.sampler_spec(kind, k)) for kind, k in listed_samplers]
    for entry in samplers:
        entry["timesteps"], entry["prev_timesteps"] = list(entry["timesteps"]), list(entry["prev_timesteps"])
    ddpm = policy.make_scheduler("ddpm", n)
    return {
        "type": "ddpm",
        "num_train_timesteps": n,
        "beta_schedule": policy_cfg.beta_schedule,
        "prediction_type": policy_cfg.prediction_type,
        "clip_sample": bool(policy_cfg.clip_sample),
        "clip_sample_range": float(ddpm.config.clip_sample_range),
        "variance_type": str(ddpm.config.variance_type),
        "betas": [float(b) for b in ddpm.betas],
        "alphas_cumprod": [float(a) for a in ddpm.alphas_cumprod],
        "default_sampler": f"{default_kind}-{default_k}",
        "samplers": samplers,
    }
