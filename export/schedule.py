"""The `scheduler` object of policy.json, computed once with diffusers (the training scheduler's source).

Runtimes never recompute the schedule: they read these arrays. Timesteps come from diffusers' own
`set_timesteps`, previous timesteps from `DiffusionPolicy.prev_timestep` (the rule the PyTorch policy's
inpainting uses), so every runtime walks exactly the chain the PyTorch policy walks.
"""

from __future__ import annotations

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

    The schedulers come from `policy.make_scheduler`, the same objects `policy.sample` steps with.
    DDPM is listed with num_train_timesteps steps, then with each count of `ddpm_steps` and the config's
    default DDPM count (descending).
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

    samplers = []
    for kind, counts in (("ddpm", [n] + ddpm_counts), ("ddim", steps)):
        for k in counts:
            sched = policy.make_scheduler(kind, k)
            ts = [int(t) for t in sched.timesteps]
            samplers.append({
                "name": f"{kind}-{k}",
                "sampler": kind,
                "num_inference_steps": k,
                "timesteps": ts,
                "prev_timesteps": [policy.prev_timestep(sched, t) for t in ts],  # -1: use final_alpha_cumprod
                "final_alpha_cumprod": float(sched.final_alpha_cumprod if kind == "ddim" else sched.one),
                "eta": 0.0,
            })
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
