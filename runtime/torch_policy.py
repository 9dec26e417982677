"""The "torch" backend: the PyTorch DiffusionPolicy behind the runtime interface (numpy in, numpy out).

    from dpkit.runtime import load_policy
    policy = load_policy("runs/tiny", backend="torch")        # checkpoint or run folder; EMA weights
    traj = policy.sample(obs, sampler="ddpm", seed=0)

Sampling itself is `DiffusionPolicy.sample` (diffusers' schedulers): this adapter only converts arrays,
resolves the default sampler the way bundles do, and draws un-injected noise from the same seeded numpy
generator as the "ort" backend, so `seed=` gives the same draws in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dpkit.runtime.bundle import validate_obs
from dpkit.runtime.sampling import draw_noise


class TorchPolicy:
    backend = "torch"

    def __init__(self, path: str | Path | None = None, ema: bool = True, device: str = "cpu", *,
                 policy: Any = None):
        """Load a checkpoint (or a run folder's latest); or wrap an in-memory `policy` (DiffusionPolicy)."""
        import torch  # noqa: F401  (fail here, clearly, on a runtime-only install)

        if policy is None:
            from dpkit.train.checkpoint import load_checkpoint

            policy, _ = load_checkpoint(path, ema=ema, device=device)
        self.policy = policy.eval()
        cfg = policy.cfg
        self.obs_mode = cfg.obs_mode
        self.n_obs_steps = cfg.n_obs_steps
        self.horizon = cfg.horizon
        self.n_action_steps = cfg.n_action_steps
        self.action_dim = cfg.action_dim
        self.observations = policy.observation_spec()
        self.obs_keys = tuple(o["name"] for o in self.observations)

    def resolve(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """(sampler, K) with the bundle's defaults: DDIM with the config's `ddim_steps`; DDPM with all steps."""
        cfg = self.policy.cfg
        sampler = sampler or "ddim"
        if steps is None:
            steps = cfg.num_train_timesteps if sampler == "ddpm" else cfg.ddim_steps
        return sampler, int(steps)

    def sample(self, obs: dict[str, np.ndarray], sampler: str | None = None, steps: int | None = None,
               initial_noise: np.ndarray | None = None, step_noise: np.ndarray | None = None,
               seed: int | None = None) -> np.ndarray:
        import torch

        sampler, steps = self.resolve(sampler, steps)
        sched = self.policy.make_scheduler(sampler, steps)  # validates sampler and steps
        arrays, batch = validate_obs(obs, self.observations, self.n_obs_steps)
        x, noise = draw_noise((batch, self.horizon, self.action_dim), len(sched.timesteps), sampler == "ddpm",
                              initial_noise, step_noise, seed)
        traj = self.policy.sample(
            {k: torch.from_numpy(v) for k, v in arrays.items()}, sampler=sampler, steps=steps,
            initial_noise=torch.from_numpy(x), step_noise=None if noise is None else torch.from_numpy(noise),
        )
        return traj.cpu().numpy().astype(np.float32, copy=False)

    def predict_action(self, obs: dict[str, np.ndarray], **kw) -> np.ndarray:
        import torch

        traj = torch.from_numpy(self.sample(obs, **kw))
        actions = self.policy.normalizer.unnormalize("action", traj)
        i = self.policy.cfg.first_action_index
        return actions[:, i : i + self.n_action_steps].numpy()
