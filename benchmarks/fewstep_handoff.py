"""The ceiling of a few-step student's second call: its first call handed on to the teacher's own chain.

    python -m dpkit.benchmarks.fewstep_handoff --teacher runs/teacher --student runs/student --level 49 \\
        --episodes 200 --sample-seed 0 --json handoff.json

fewstep-2 re-noises the student's first output to its second timestep and calls the student once more. Here
the rest is the teacher's instead: the student's first call from pure noise, re-noised to `--level` by the
few-step rule, then the teacher's deterministic DDIM chain from there (steps of num_train_timesteps //
`--teacher-ddim-steps`, as distill.teacher_ddim_steps). A second call trained on the student's own states
(distill.later_inputs=student) learns exactly that chain, so this score is what such a call could reach at
that level, and how far the student's first call alone limits it. Scored like dpkit-eval (the original
protocol, legacy seeds from --seed-start, chunk noise from --sample-seed) with both networks in PyTorch; the
result is dpkit-eval's report with a "handoff" entry.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from dpkit.cli_args import add_common_args, apply_threads
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_json, check_writable_file


class Handoff:
    """sample(): the student's first call, re-noised to `level`, then the teacher's DDIM chain from there."""

    def __init__(self, teacher: Any, student: Any, level: int, teacher_ddim_steps: int):
        from dpkit.sampling import SamplerSpec, StepPlan
        from dpkit.train.distill import ode_chain

        if teacher.cfg.fewstep_timesteps:
            raise DpkitError("--teacher is a few-step student: give the diffusion policy it was distilled from")
        if not student.cfg.fewstep_timesteps:
            raise DpkitError("--student is not a few-step student (a dpkit-distill run)")
        if (teacher.cfg.obs_mode, teacher.cfg.horizon, teacher.cfg.action_dim) != \
                (student.cfg.obs_mode, student.cfg.horizon, student.cfg.action_dim):
            raise DpkitError("--teacher and --student differ in observations, horizon or action size")
        first = student.cfg.fewstep_timesteps[0]
        T = teacher.cfg.num_train_timesteps
        if not 0 <= level < first:
            raise DpkitError(f"--level must be in [0, {first}) (below the student's first timestep), got {level}")
        if not 1 <= teacher_ddim_steps <= T:
            raise DpkitError(f"--teacher-ddim-steps must be in [1, {T}], got {teacher_ddim_steps}")
        self.teacher, self.student, self.level = teacher.eval(), student.eval(), level
        self.first = first
        # the few-step rule from the student's first timestep to `level`: the re-noise fewstep-2 does there
        self.renoise = StepPlan.build(student.schedule_arrays,
                                      SamplerSpec("handoff", "fewstep", 2, (first, level), (level, -1), 1.0))
        self.chain = StepPlan.build(teacher.schedule_arrays, ode_chain(level, T // teacher_ddim_steps))

    def sample(self, obs: dict[str, Any], initial_noise: Any, noise: Any) -> Any:
        """(B, H, A) normalized trajectory from torch tensors: initial noise and the re-noise, each (B, H, A)."""
        import torch

        from dpkit.sampling import run_reverse

        s, t = self.student, self.teacher
        with torch.no_grad():
            cond = s.encoder(*s._check_obs(obs, check_finite=True))
            steps = torch.full((initial_noise.shape[0],), self.first, dtype=torch.int64)
            x = self.renoise.step(0, initial_noise, s.denoiser(initial_noise, steps, cond), noise)
            tcond = t.encoder(*t._check_obs(obs, check_finite=True))
            return run_reverse(lambda xt, tt: t.denoiser(xt, torch.from_numpy(tt), tcond), self.chain, x, None)


def handoff_policy(teacher_path: str, student_path: str, level: int, teacher_ddim_steps: int, threads: int | None):
    """The student's run as a dpkit-eval policy whose fewstep-2 is the handoff (Handoff)."""
    import torch

    from dpkit.runtime.torch_policy import TorchPolicy
    from dpkit.train.checkpoint import load_checkpoint

    teacher, _ = load_checkpoint(teacher_path, ema=True)

    class HandoffPolicy(TorchPolicy):
        def _run(self, arrays, batch, choice, initial_noise, step_noise, inpaint) -> np.ndarray:
            if inpaint is not None or step_noise is None:
                raise DpkitError("the handoff samples whole chunks with fewstep-2's noise (no prefix)")
            obs = {k: torch.from_numpy(v) for k, v in arrays.items()}
            return self.handoff.sample(obs, torch.from_numpy(initial_noise), torch.from_numpy(step_noise[0])).numpy()

    policy = HandoffPolicy(student_path, threads=threads)
    policy.handoff = Handoff(teacher, policy.policy, level, teacher_ddim_steps)
    if len(policy.policy.cfg.fewstep_timesteps) < 2:  # the re-noise takes fewstep-2's step noise
        raise DpkitError("--student has one timestep: the handoff needs a student with fewstep-2")
    return policy


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fewstep_handoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's run folder or checkpoint")
    p.add_argument("--student", required=True, help="the student's run folder or checkpoint")
    p.add_argument("--level", type=int, required=True, help="the timestep the teacher's chain takes over at")
    p.add_argument("--teacher-ddim-steps", type=int, default=10, help="the teacher's chain (default %(default)s)")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--seed-start", type=int, default=100000, help="first legacy seed (default: the test seeds)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--sample-seed", type=int, default=0)
    add_common_args(p, json="write the report here")  # --threads, --no-progress, --json, --version
    args = p.parse_args(argv)
    threads = apply_threads(args) or None
    if args.json:
        check_writable_file(args.json)
    from dpkit.eval.evaluate import evaluate_policy

    policy = handoff_policy(args.teacher, args.student, args.level, args.teacher_ddim_steps, threads)
    report = evaluate_policy(policy, episodes=args.episodes, seed_start=args.seed_start, max_steps=args.max_steps,
                             progress=not args.no_progress, sampler="fewstep", steps=2, sample_seed=args.sample_seed)
    report["handoff"] = {"teacher": args.teacher, "student": args.student, "level": args.level,
                         "teacher_ddim_steps": args.teacher_ddim_steps,
                         "teacher_calls": len(policy.handoff.chain.timesteps)}
    print(f"handoff at {args.level} (student call, then {report['handoff']['teacher_calls']} teacher calls): "
          f"score {report['score']:.3f}, success {report['success_rate']:.2f} over {args.episodes} episodes")
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    main()
