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
With `distill.draws_per_window` N >= 1 each window has N fixed draws (level and noise from a generator
seeded by the window's content, the draw and train.seed) whose targets are computed once and cached, so the
teacher's cost is paid once per draw and the budget buys student steps; the cache is saved with each
checkpoint (trainer_state.pt), so a resumed run sees the same targets. `distill.unexecuted_weight` < 1
weighs the trajectory steps a chunk does not execute less in the loss (step_weights), so the fit goes to
the actions the controller runs; `distill.pseudo_huber` c > 0 makes the loss robust per window
(DiffusionPolicy.forward). With `distill.later_inputs` "teacher_path" the later levels' inputs are
instead the states the first level's chain passes through there (each draw then gives every level an input
and a target from one chain, for the chain's cost alone); with "student" they are what the student's own
sampler feeds those calls (its earlier calls from pure noise, re-noised by the few-step rule), so the later
calls learn to finish the student's own first guesses the way the teacher's chain would (from step
`distill.later_inputs_from` on; those targets move with the student and are not cached). With
`distill.rollout_at` the student also learns
on the states it visits itself (on-policy states, as in DAgger): at those steps the trainer rolls the EMA
student out in gym-pusht, its observation windows join the data (add_rollout_windows), and from then on a
`distill.rollout_fraction` share of every batch is drawn from them, with inputs and targets from the
teacher's chain from pure noise (they have no demonstrated actions).
Why this method and what it was measured against: README, "Few-step policies".

Everything else is the trainer's: run folder, resume after kill -9 (the draws here come from the
per-micro-batch generators the trainer reseeds), EMA, accelerate processes, progress, JSON summary and
rollout evaluations during the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpkit.errors import DpkitError
from dpkit.sampling import SamplerSpec, StepPlan, run_reverse
from dpkit.train import checkpoint as ckpt_io
from dpkit.train.config import Config, DistillConfig, PolicyConfig, off_chain

# The policy fields a student sets itself; every other one is the teacher's (the same network).
STUDENT_FIELDS = ("fewstep_timesteps", "prediction_type", "default_sampler", "fewstep_later_epsilon")


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
                               default_sampler="fewstep", fewstep_later_epsilon=distill.later_epsilon)


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

    def __init__(self, path: str | Path, distill: DistillConfig, device: torch.device | str = "cpu", seed: int = 0):
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
        self.path = distill.later_inputs == "teacher_path"
        # later_inputs "student": the later levels' inputs are the student's own few-step states (attach_student)
        self.on_student = distill.later_inputs == "student"
        self.student: Any = None
        off = off_chain(distill, T)
        if (self.path or distill.rollout_at) and off:
            raise DpkitError(f"distill.later_inputs=teacher_path / rollout_at: timesteps {off} are not on the "
                             f"teacher's chain from {self.timesteps[0]} in steps of {stride} (num_train_timesteps "
                             f"{T} // teacher_ddim_steps {distill.teacher_ddim_steps})")
        acp = policy.schedule_arrays.alphas_cumprod
        # The forward process's scalars per level, float32 as the training loss's add_noise takes them.
        self.sqrt_a = [float(np.float32(np.sqrt(acp[t]))) for t in self.timesteps]
        self.sqrt_1m_a = [float(np.float32(np.sqrt(1.0 - acp[t]))) for t in self.timesteps]
        self.draws = distill.draws_per_window
        self.weight = step_weights(policy.cfg, distill.unexecuted_weight)
        self.pseudo_huber = float(distill.pseudo_huber)
        self.seed = int(seed)
        self.cache: dict[bytes, tuple[torch.Tensor, torch.Tensor, int]] = {}  # draw key -> (noisy, target, t)
        self.teacher_windows = 0  # windows the teacher denoised (cache misses when draws are fixed)
        # On-policy states: the observation windows of the student's rollouts so far (add_rollout_windows)
        self.rollout_fraction = float(distill.rollout_fraction)
        self.rollout_obs: dict[str, torch.Tensor] | None = None
        # The energy term (distill.energy_weight): its weight, windows and samples per batch
        self.energy = (float(distill.energy_weight), int(distill.energy_rows), int(distill.energy_samples))

    def attach_student(self, student: Any) -> None:
        """The policy being distilled (its current weights), whose own few-step states are the later levels'
        inputs with later_inputs "student"; the trainer attaches it before the first batch."""
        self.student = student

    def describe(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "step": self.step, "weights": self.weights}

    @torch.no_grad()
    def targets(self, batch: dict[str, Any], rollouts: bool = True, energy: bool = True,
                on_student: bool = True) -> dict[str, Any]:
        """A training batch {"obs", "action"} -> the student's {"obs", "noisy", "timestep", "target"}.
        Draws come from torch's global generator, which the trainer reseeds per micro-batch; with
        `draws_per_window` they are fixed per window (draw_inputs) and their targets cached. Once rollout
        windows exist (and `rollouts`), the batch's last `rollout_fraction` of rows are replaced by rollout
        windows drawn at random, whose inputs come from the teacher's chain (they have no actions). With
        distill.energy_weight > 0 (and `energy`) the batch also carries the energy term's "energy" entry
        (energy_inputs). With later_inputs "student" (and `on_student`; else as "noised_actions") the later
        levels' inputs are the attached student's own few-step states (_student_rows)."""
        obs = batch["obs"]
        x0 = self.policy.normalizer.normalize("action", batch["action"].float())
        n = x0.shape[0]
        k = round(n * self.rollout_fraction) if rollouts and self.rollout_obs is not None else 0
        # the energy term's noise is drawn after the regression's draws, which stay those of a run without it
        def extra() -> dict[str, Any]:
            return self.energy_inputs(x0[: n - k]) if energy and self.energy[0] > 0 else {}

        if k == 0:
            return {"obs": obs, **self._rows(obs, x0, batch["action"], self.path, on_student), **self._weight(x0),
                    **extra()}
        pick = torch.randint(0, self.rollout_windows, (k,)).to(x0.device)
        mine = {key: v[pick] for key, v in self.rollout_obs.items()}
        theirs = {key: v[: n - k] for key, v in obs.items()}
        # a rollout window has no action: its draw key digests the window with an all-NaN action instead
        out = [self._rows(theirs, x0[: n - k], batch["action"][: n - k], self.path, on_student),
               self._rows(mine, x0[n - k:], torch.full_like(batch["action"][n - k:], torch.nan), True)]
        return {"obs": {key: torch.cat([theirs[key], mine[key]]) for key in obs},
                **{key: torch.cat([o[key] for o in out]) for key in out[0]}, **self._weight(x0), **extra()}

    def energy_inputs(self, x0: torch.Tensor) -> dict[str, Any]:
        """The energy term's entry for a batch whose first rows are demonstration windows with normalized
        actions x0: {"energy": {"weight", "target": the first energy_rows windows' actions (m, H, A), "noise":
        (samples, calls, m, H, A), each sample's initial noise and its re-noise before each later call}}.
        DiffusionPolicy.forward scores the student's samples on the batch's first m windows with it."""
        weight, rows, samples = self.energy
        m = min(rows, x0.shape[0])
        if m == 0:
            return {}
        noise = torch.randn((samples, len(self.timesteps), m, *x0.shape[1:]), device=x0.device, dtype=x0.dtype)
        return {"energy": {"weight": weight, "target": x0[:m], "noise": noise}}

    def _rows(self, obs: dict[str, Any], x0: torch.Tensor, action: torch.Tensor, path: bool,
              on_student: bool = False) -> dict[str, Any]:
        """{"noisy", "timestep", "target"} for these windows (x0: their normalized actions; with `path` their
        later levels' inputs come from the teacher's chain, so x0 only gives the shape; with `on_student` and
        later_inputs "student" from the student's own states)."""
        n = x0.shape[0]
        if n == 0:
            return {"noisy": x0, "timestep": torch.empty(0, dtype=torch.int64, device=x0.device), "target": x0}
        if self.on_student and on_student and not path:
            return self._student_rows(obs, x0, action)
        if not self.draws:
            level = torch.randint(0, len(self.timesteps), (n,), device=x0.device)
            z = torch.randn_like(x0)
            if path:
                inputs, target = self._path(obs, z)
                noisy = inputs[level, torch.arange(n)]
                timestep = torch.tensor(self.timesteps, dtype=torch.int64, device=x0.device)[level]
            else:
                noisy, target, timestep = self._denoise(obs, x0, level, z)
            return {"noisy": noisy, "timestep": timestep, "target": target}
        draws = self.draw_keys(obs, action, torch.randint(0, self.draws, (n,)))
        # on the teacher's path a draw's one chain gives every level: the batch picks one per row (a cache
        # key is the draw's and a level byte; 255 where the draw fixes the level itself)
        keys = ([k + bytes([int(j)]) for k, j in zip(draws, torch.randint(0, len(self.timesteps), (n,)))]
                if path else [k + b"\xff" for k in draws])
        misses = [i for i, k in enumerate(keys) if k not in self.cache]
        if misses:
            rows = torch.tensor(misses, device=x0.device)
            level, z = self.draw_inputs([draws[i] for i in misses], x0)
            sub = {k: v[rows] for k, v in obs.items()}
            if path:
                inputs, target = self._path(sub, z)
                for j, i in enumerate(misses):
                    for lv, t in enumerate(self.timesteps):
                        self.cache[draws[i] + bytes([lv])] = (inputs[lv, j], target[j], t)
            else:
                noisy, target, timestep = self._denoise(sub, x0[rows], level, z)
                for j, i in enumerate(misses):
                    self.cache[keys[i]] = (noisy[j], target[j], int(timestep[j]))
        hits = [self.cache[k] for k in keys]
        return {"noisy": torch.stack([h[0] for h in hits]), "target": torch.stack([h[1] for h in hits]),
                "timestep": torch.tensor([h[2] for h in hits], dtype=torch.int64, device=x0.device)}

    def _student_rows(self, obs: dict[str, Any], x0: torch.Tensor, action: torch.Tensor) -> dict[str, Any]:
        """later_inputs "student": each row's level and noise z as the draws give them (fixed per window with
        draws_per_window, else fresh). At the first level the input is z and the target the teacher's chain
        from it (cached with fixed draws); at a later level the input is what the student's own sampler feeds
        that call: its earlier calls from z, each output re-noised by the few-step rule with fresh noise
        (student_states). Those inputs move with the student, so their targets are computed every time."""
        n = x0.shape[0]
        if self.draws:
            draws = self.draw_keys(obs, action, torch.randint(0, self.draws, (n,)))
            level, z = self.draw_inputs(draws, x0)
        else:
            draws = None
            level = torch.randint(0, len(self.timesteps), (n,), device=x0.device)
            z = torch.randn_like(x0)
        noisy, target = torch.empty_like(x0), torch.empty_like(x0)
        first = (level == 0).nonzero().flatten().tolist()
        if draws is not None:
            keys = {i: draws[i] + b"\xff" for i in first}
            misses = [i for i in first if keys[i] not in self.cache]
            if misses:
                rows = torch.tensor(misses, device=x0.device)
                sub = {k: v[rows] for k, v in obs.items()}
                _, got, _ = self._denoise(sub, z[rows], torch.zeros_like(rows), z[rows])
                for j, i in enumerate(misses):
                    self.cache[keys[i]] = (z[i], got[j], self.timesteps[0])
            for i in first:
                noisy[i], target[i] = self.cache[keys[i]][0], self.cache[keys[i]][1]
            later = [i for i in range(n) if i not in keys]
        else:
            later = list(range(n))  # the first level's rows too: their input is z itself
        if later:
            rows = torch.tensor(later, device=x0.device)
            sub = {k: v[rows] for k, v in obs.items()}
            inputs = self.student_states(sub, z[rows], level[rows])
            noisy[rows], target[rows], _ = self._denoise(sub, z[rows], level[rows], z[rows], inputs)
        timestep = torch.tensor(self.timesteps, dtype=torch.int64, device=x0.device)[level.to(x0.device)]
        return {"noisy": noisy, "timestep": timestep, "target": target}

    def student_states(self, obs: dict[str, Any], z: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """The input the attached student's few-step sampler gives its call `level[i]` for row i when it starts
        from pure noise z[i]: z at level 0; else its calls 0 .. level - 1, each output re-noised to the next
        timestep by the few-step rule (the policy's StepPlan, the one every runtime runs) with fresh noise from
        torch's generator. No gradient: the student is read, not trained, here."""
        student = self.student
        if student is None:
            raise RuntimeError("later_inputs 'student' needs the student: Teacher.attach_student first")
        x = z.clone()
        top = int(level.max()) if len(level) else 0
        if top == 0:
            return x
        was_training = student.training
        student.eval()  # as it samples (an image encoder's center crop, no random crop drawn)
        try:
            with torch.no_grad():
                cond = student.encoder(*student._check_obs(obs, check_finite=False))
                plan = student.step_plan("fewstep", top + 1)
                for k in range(top):
                    rows = (level > k).nonzero().flatten()
                    t = torch.full((len(rows),), int(plan.timesteps[k]), dtype=torch.int64, device=x.device)
                    out = student.denoiser(x[rows], t, cond[rows])
                    # a contiguous draw: randn_like would follow the denoiser output's strides
                    x[rows] = plan.step(k, x[rows], out, torch.randn(out.shape, dtype=out.dtype, device=out.device))
        finally:
            student.train(was_training)
        return x

    @property
    def rollout_windows(self) -> int:
        return 0 if self.rollout_obs is None else len(next(iter(self.rollout_obs.values())))

    def add_rollout_windows(self, obs: dict[str, torch.Tensor]) -> None:
        """Add observation windows (name -> (N, To, ...) raw units) the student acted on in rollouts."""
        device = next(self.policy.parameters()).device
        obs = {k: v.to(device=device, dtype=torch.float32) for k, v in obs.items()}
        self.rollout_obs = (obs if self.rollout_obs is None
                            else {k: torch.cat([self.rollout_obs[k], obs[k]]) for k in self.rollout_obs})

    def rollout_state(self) -> dict[str, torch.Tensor]:
        """The rollout windows as plain tensors (trainer_state.pt's "rollout_windows")."""
        return {} if self.rollout_obs is None else {k: v.cpu() for k, v in self.rollout_obs.items()}

    def load_rollouts(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore rollout_state()'s windows (nothing when the checkpoint has none)."""
        if not state:
            return
        keys = list(self.policy.encoder.obs_keys)
        try:
            ok = sorted(state) == sorted(keys) and len({v.shape[0] for v in state.values()}) == 1 and all(
                v.dtype == torch.float32 and v.dim() >= 2 and v.shape[1] == self.policy.cfg.n_obs_steps
                for v in state.values())
        except (AttributeError, TypeError):
            ok = False
        if not ok:
            raise DpkitError(f"checkpoint's trainer_state.pt has malformed rollout_windows (float32 {keys} "
                             f"windows of n_obs_steps={self.policy.cfg.n_obs_steps}, one count)")
        self.rollout_obs = None
        self.add_rollout_windows(state)

    def _weight(self, x0: torch.Tensor) -> dict[str, Any]:
        """The batch's loss settings: per-step weights and the pseudo-Huber scale ({} for the plain MSE)."""
        out: dict[str, Any] = {} if self.weight is None else {"weight": self.weight.to(x0.device)}
        if self.pseudo_huber:
            out["pseudo_huber"] = self.pseudo_huber
        return out

    def cache_state(self) -> dict[str, torch.Tensor]:
        """The cached draws as plain tensors (trainer_state.pt's "teacher_cache"): a resumed run loads them
        instead of recomputing, because a target computed in another batch can differ in the last bit."""
        if not self.cache:
            return {}
        keys = list(self.cache)
        return {"keys": torch.tensor(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), -1)),
                "noisy": torch.stack([self.cache[k][0] for k in keys]).cpu(),
                "target": torch.stack([self.cache[k][1] for k in keys]).cpu(),
                "timestep": torch.tensor([self.cache[k][2] for k in keys], dtype=torch.int64)}

    def load_cache(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore cache_state()'s draws (nothing to do without fixed draws or a saved cache)."""
        if not self.draws or not state:
            return
        try:
            keys, noisy, target, timestep = (state[k] for k in ("keys", "noisy", "target", "timestep"))
            n = keys.shape[0]
            ok = (keys.dtype == torch.uint8 and keys.dim() == 2 and noisy.shape == target.shape
                  and noisy.shape[0] == n and timestep.shape == (n,)
                  and set(timestep.tolist()) <= set(self.timesteps))
        except (KeyError, AttributeError, TypeError):
            ok = False
        if not ok:
            raise DpkitError("checkpoint's trainer_state.pt has a malformed teacher_cache (keys, noisy, target, "
                             "timestep of one length, at the student's timesteps)")
        if keys.shape[1] == 16:  # saved before rollout windows: a draw-fixed level's key had no level byte
            keys = torch.cat([keys, torch.full((n, 1), 255, dtype=torch.uint8)], dim=1)
        device = next(self.policy.parameters()).device
        noisy, target = noisy.to(device), target.to(device)
        for i in range(n):
            self.cache[bytes(keys[i].numpy())] = (noisy[i], target[i], int(timestep[i]))

    def draw_keys(self, obs: dict[str, torch.Tensor], action: torch.Tensor, draw: torch.Tensor) -> list[bytes]:
        """One key per window and draw: a digest of the window's observations and actions, the draw's index
        and the seed. The draw's input (draw_inputs) is a function of the key alone, so a resumed run, or a
        run whose cache was dropped, sees the same inputs and targets."""
        data = torch.cat([v.reshape(v.shape[0], -1).float() for _, v in sorted(obs.items())]
                         + [action.reshape(action.shape[0], -1).float()], dim=1).cpu().numpy()
        return [hashlib.blake2b(data[i].tobytes() + int(draw[i]).to_bytes(4, "little")
                                + self.seed.to_bytes(8, "little"), digest_size=16).digest()
                for i in range(data.shape[0])]

    def draw_inputs(self, keys: list[bytes], x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each key's level (which student timestep) and noise, from a generator seeded by the key."""
        level = torch.empty(len(keys), dtype=torch.int64)
        z = torch.empty((len(keys), *x0.shape[1:]))
        for i, k in enumerate(keys):
            g = torch.Generator().manual_seed(int.from_bytes(k[:8], "little"))
            level[i] = int(torch.randint(0, len(self.timesteps), (1,), generator=g))
            z[i] = torch.randn(x0.shape[1:], generator=g)
        return level.to(x0.device), z.to(device=x0.device, dtype=x0.dtype)

    def _path(self, obs: dict[str, Any], z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's chain from pure noise z at the first timestep: the state it passes through at each
        student timestep (L, n, ...; the first is z itself) and its result (n, ...)."""
        policy = self.policy
        self.teacher_windows += z.shape[0]
        cond = policy.encoder(*policy._check_obs(obs, check_finite=False))
        seen: dict[int, torch.Tensor] = {}

        def denoise(x: torch.Tensor, tt: np.ndarray) -> torch.Tensor:
            seen.setdefault(int(tt[0]), x)  # the step's input: the chain's state at that timestep
            return policy.denoiser(x, torch.from_numpy(tt).to(x.device), cond)

        target = run_reverse(denoise, self.plans[0], z, None)
        return torch.stack([seen[t] for t in self.timesteps]), target

    def _denoise(self, obs: dict[str, Any], x0: torch.Tensor, level: torch.Tensor, z: torch.Tensor,
                 inputs: torch.Tensor | None = None):
        """The student's inputs at each row's level and the teacher's DDIM result from them (`inputs`: the
        inputs given, e.g. the student's own states, instead of noise or noised actions)."""
        policy = self.policy
        n = x0.shape[0]
        self.teacher_windows += n
        noisy = torch.empty_like(x0)
        target = torch.empty_like(x0)
        timestep = torch.empty(n, dtype=torch.int64, device=x0.device)
        cond = policy.encoder(*policy._check_obs(obs, check_finite=False))
        for j, t in enumerate(self.timesteps):
            rows = (level == j).nonzero().flatten()
            if len(rows) == 0:
                continue
            # the first timestep starts from pure noise, as sampling does; later ones from noised actions
            if inputs is not None:
                x_t = inputs[rows]
            else:
                x_t = z[rows] if j == 0 else self.sqrt_a[j] * x0[rows] + self.sqrt_1m_a[j] * z[rows]
            c = cond[rows]

            def denoise(x: torch.Tensor, tt: np.ndarray, c: torch.Tensor = c) -> torch.Tensor:
                return policy.denoiser(x, torch.from_numpy(tt).to(x.device), c)

            noisy[rows] = x_t
            target[rows] = run_reverse(denoise, self.plans[j], x_t, None)
            timestep[rows] = t
        return noisy, target, timestep


def step_weights(cfg: PolicyConfig, unexecuted: float) -> torch.Tensor | None:
    """The loss weight of each trajectory step: 1 where a chunk executes (n_action_steps from n_obs_steps - 1),
    `unexecuted` elsewhere; None when that is 1 (the plain MSE)."""
    if unexecuted == 1.0:
        return None
    w = torch.full((cfg.horizon,), float(unexecuted))
    w[cfg.n_obs_steps - 1: cfg.n_obs_steps - 1 + cfg.n_action_steps] = 1.0
    return w


def ode_chain(t: int, stride: int) -> SamplerSpec:
    """The teacher's deterministic DDIM chain from timestep t to the end: t, t - stride, ..., then x0."""
    ts = tuple(range(t, -1, -stride))
    return SamplerSpec(f"ddim-from-{t}", "ddim", len(ts), ts, ts[1:] + (-1,), 1.0)
