"""The "torch" backend: the PyTorch DiffusionPolicy behind the runtime interface (numpy in, numpy out).

    from dpkit.runtime import load_policy
    policy = load_policy("runs/tiny", backend="torch")        # checkpoint or run folder; EMA weights
    traj = policy.sample(obs, sampler="ddpm", seed=0)

Sampling itself is `DiffusionPolicy.sample` (diffusers' schedulers, any K in 1..num_train_timesteps);
everything else — argument checks, the default sampler, seeded noise, the executed slice — is the shared
PolicyBackend, so `seed=` gives the same draws as the "ort" and "cpp" backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dpkit.errors import DpkitError
from dpkit.runtime.backend import PolicyBackend, PolicySpec, SamplerChoice
from dpkit.threads import apply_torch, choose_threads


class TorchPolicy(PolicyBackend):
    backend = "torch"

    def __init__(self, path: str | Path | None = None, ema: bool = True, device: str = "cpu", *,
                 policy: Any = None, threads: int | None = None):
        """Load a checkpoint (or a run folder's latest); or wrap an in-memory `policy` (DiffusionPolicy).

        `threads`: torch's intra-op threads, which are the whole process's (None or 0: dpkit.threads' choice
        for the model's size). A wrapped in-memory policy leaves them alone unless `threads` is given: its
        owner (the trainer) has chosen already. `self.threads` records the choice (None when untouched).
        """
        import torch  # noqa: F401  (fail here, clearly, on a runtime-only install)

        loaded = policy is None
        if policy is None:
            from dpkit.train.checkpoint import load_checkpoint

            policy, _ = load_checkpoint(path, ema=ema, device=device)
        self.policy = policy
        self.threads = None
        if loaded or threads:
            self.threads = choose_threads(threads, params=sum(p.numel() for p in policy.parameters()))
            apply_torch(self.threads)
        cfg = policy.cfg
        scale, offset = policy.normalizer.unnormalize_affine("action")
        super().__init__(PolicySpec(cfg.obs_mode, cfg.n_obs_steps, cfg.horizon, cfg.n_action_steps, cfg.action_dim,
                                    cfg.first_action_index, tuple(policy.observation_spec()), scale, offset))

    def _find(self, sampler: str | None, steps: int | None) -> SamplerChoice:
        kind, k = self.policy.resolve_sampler(sampler, steps)
        plan = self.policy.step_plan(kind, k)  # refuses a K the kind cannot run
        return SamplerChoice(plan.sampler.name, kind, k, uses_step_noise=plan.uses_step_noise)

    def _run(self, arrays, batch, choice, initial_noise, step_noise, inpaint) -> np.ndarray:
        import torch

        was_training = self.policy.training
        self.policy.eval()  # inference behaviour (center crop), also for an in-training policy
        try:
            traj = self.policy.sample(
                {k: torch.from_numpy(v) for k, v in arrays.items()}, sampler=choice.sampler,
                steps=choice.num_inference_steps, initial_noise=torch.from_numpy(initial_noise),
                step_noise=None if step_noise is None else torch.from_numpy(step_noise),
                inpaint=None if inpaint is None else (inpaint.start, torch.from_numpy(inpaint.values),
                                                      torch.from_numpy(inpaint.weights)))
        finally:
            self.policy.train(was_training)
        return traj.cpu().numpy()
