"""Distillation into a few-step student: the trainer's mode that turns any dpkit policy into a 1-2 call one.

    dpkit-distill runs/teacher --out runs/student           # the pusht_lowdim_cpu_distill recipe
    dpkit-distill runs/converted --out runs/student --config my_recipe.yaml distill.timesteps=[99]

The method: regression onto the teacher's deterministic DDIM result from the same input. The student has
the teacher's network and starts from its weights, but predicts the clean trajectory x0 (prediction_type
"sample") at a few timesteps (`distill.timesteps`, e.g. 99 and 49). Each training window gets one of them:
at the first the input is pure noise (where sampling starts), at the others the window's own actions
noised to that level with fresh noise (where the few-step rule re-noises the student's x0 to). The target
is what the teacher's DDIM chain (`distill.teacher_ddim_steps` over the whole schedule) makes of that input,
so the student learns the teacher's ODE map in one call per level. Sampling then runs the few-step rule
(dpkit.sampling, kind "fewstep"): x0 from the first call, re-noised to the next timestep, one more call.
Why this method and what it was measured against: README, "Few-step policies".

Everything else is the trainer's: run folder, resume after kill -9 (the draws here come from the
per-micro-batch generators the trainer reseeds), EMA, accelerate processes, progress, JSON summary and
rollout evaluations during the run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpkit.errors import DpkitError
from dpkit.sampling import SamplerSpec, StepPlan, run_reverse
from dpkit.train import checkpoint as ckpt_io
from dpkit.train.config import Config, DistillConfig, PolicyConfig

# The policy fields a student sets itself; every other one is the teacher's (the same network).
STUDENT_FIELDS = ("fewstep_timesteps", "prediction_type", "default_sampler")


def teacher_checkpoint(path: str | Path) -> Path:
    """The checkpoint a teacher path names (a run folder: its latest), or one clear error."""
    p = Path(path)
    if not p.exists():
        raise DpkitError(f"teacher {path}: no such run folder")
    try:
        return ckpt_io.resolve_checkpoint(p)
    except DpkitError as e:
        raise DpkitError(f"teacher {path} is not a dpkit run folder or checkpoint ({e})") from None


def student_config(recipe: Config, teacher_cfg: Config) -> Config:
    """The distillation config: the recipe's train and distill sections, the teacher's data, and the
    teacher's policy made a few-step student (STUDENT_FIELDS)."""
    if teacher_cfg.policy.fewstep_timesteps:
        raise DpkitError("the teacher is itself a few-step student: distill from a diffusion policy")
    cfg = dataclasses.replace(recipe, data=dataclasses.replace(teacher_cfg.data),
                              policy=student_policy(teacher_cfg.policy, recipe.distill))
    return cfg.validate()


def student_policy(teacher: PolicyConfig, distill: DistillConfig) -> PolicyConfig:
    return dataclasses.replace(teacher, fewstep_timesteps=tuple(distill.timesteps), prediction_type="sample",
                               default_sampler="fewstep")


def check_student(student: PolicyConfig, teacher: PolicyConfig) -> None:
    """A student keeps the teacher's network: every policy field but STUDENT_FIELDS must be the teacher's."""
    for f in dataclasses.fields(PolicyConfig):
        if f.name in STUDENT_FIELDS:
            continue
        mine, theirs = getattr(student, f.name), getattr(teacher, f.name)
        if mine != theirs:
            raise DpkitError(f"the student's policy.{f.name} = {mine!r} does not match the teacher's {theirs!r} "
                             f"(a student keeps the teacher's network; only policy.{', policy.'.join(STUDENT_FIELDS)} "
                             f"differ)")


class Teacher:
    """A frozen teacher policy and the DDIM chain from each student timestep to the end."""

    def __init__(self, path: str | Path, distill: DistillConfig, device: torch.device | str = "cpu"):
        from dpkit.train.checkpoint import load_checkpoint

        self.checkpoint = teacher_checkpoint(path)
        policy, state = load_checkpoint(self.checkpoint, ema=True, device=device)
        if policy.cfg.fewstep_timesteps:
            raise DpkitError(f"teacher {path} is itself a few-step student: distill from a diffusion policy")
        self.policy = policy.eval().requires_grad_(False)
        self.step = int(state["step"])
        self.weights = state["weights"]
        T = policy.cfg.num_train_timesteps
        if distill.timesteps[0] >= T or distill.teacher_ddim_steps > T:
            raise DpkitError(f"distill.timesteps {list(distill.timesteps)} / teacher_ddim_steps "
                             f"{distill.teacher_ddim_steps} do not fit the teacher's num_train_timesteps={T}")
        self.timesteps = tuple(distill.timesteps)
        stride = T // distill.teacher_ddim_steps
        self.plans = [StepPlan.build(policy.schedule_arrays, ode_chain(t, stride)) for t in self.timesteps]
        acp = policy.schedule_arrays.alphas_cumprod
        # The forward process's scalars per level, float32 as the training loss's add_noise takes them.
        self.sqrt_a = [float(np.float32(np.sqrt(acp[t]))) for t in self.timesteps]
        self.sqrt_1m_a = [float(np.float32(np.sqrt(1.0 - acp[t]))) for t in self.timesteps]

    def describe(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "step": self.step, "weights": self.weights}

    @torch.no_grad()
    def targets(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch {"obs", "action"} -> the student's {"obs", "noisy", "timestep", "target"}.
        Draws (levels, noise) come from torch's global generator, which the trainer reseeds per micro-batch."""
        policy = self.policy
        obs = batch["obs"]
        x0 = policy.normalizer.normalize("action", batch["action"].float())
        n = x0.shape[0]
        level = torch.randint(0, len(self.timesteps), (n,), device=x0.device)
        z = torch.randn_like(x0)
        noisy = torch.empty_like(x0)
        target = torch.empty_like(x0)
        timestep = torch.empty(n, dtype=torch.int64, device=x0.device)
        cond = policy.encoder(*policy._check_obs(obs, check_finite=False))
        for j, t in enumerate(self.timesteps):
            rows = (level == j).nonzero().flatten()
            if len(rows) == 0:
                continue
            # the first timestep starts from pure noise, as sampling does; later ones from noised actions
            x_t = z[rows] if j == 0 else self.sqrt_a[j] * x0[rows] + self.sqrt_1m_a[j] * z[rows]
            c = cond[rows]

            def denoise(x: torch.Tensor, tt: np.ndarray, c: torch.Tensor = c) -> torch.Tensor:
                return policy.denoiser(x, torch.from_numpy(tt).to(x.device), c)

            noisy[rows] = x_t
            target[rows] = run_reverse(denoise, self.plans[j], x_t, None)
            timestep[rows] = t
        return {"obs": obs, "noisy": noisy, "timestep": timestep, "target": target}


def ode_chain(t: int, stride: int) -> SamplerSpec:
    """The teacher's deterministic DDIM chain from timestep t to the end: t, t - stride, ..., then x0."""
    ts = tuple(range(t, -1, -stride))
    return SamplerSpec(f"ddim-from-{t}", "ddim", len(ts), ts, ts[1:] + (-1,), 1.0)
