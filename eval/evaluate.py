"""Score a policy in gym-pusht with the original Diffusion Policy protocol.

    dpkit-eval --random --episodes 50 --json demo_out/random.json      # the random baseline
    dpkit-eval --bundle bundles/tiny --backend cpp --video-dir demo_out/videos --json demo_out/eval.json
    dpkit-eval --checkpoint runs/tiny --episodes 10 --max-steps 100     # PyTorch, quick look
    dpkit-eval --bundle bundles/converted --protocol lerobot --n-envs 10  # lerobot-eval's rules and metrics

Protocol: episode i starts from the legacy state of seed `seed_start + i` (test seeds 100000..100049),
runs at most 300 steps, the policy sees the last `To` observations (at reset the first one repeated) and
`Ta` actions are executed per chunk (receding horizon). An episode's result is its max reward
(clip(coverage / 0.95, 0, 1)); the score is the mean over episodes. An episode stops early on success
(coverage > 0.95): its reward is then 1, the cap, so its max reward is what running on would give.

All environments step together: each chunk, the policy is called once for every running episode.

`--protocol lerobot` evaluates the way lerobot-eval (lerobot 0.6.1) does instead (dpkit.eval.lerobot_protocol):
seeds 1000, 1001, ... through gym-pusht's own reset(seed), 50 episodes in lock-step batches of --n-envs, and
lerobot's metrics avg_sum_reward, avg_max_reward and pc_success. The original protocol stays the default.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dpkit.cli_args import add_common_args, add_sampler_args, apply_threads, resolve_sampler_args
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_bytes, atomic_write_json, check_writable_dir, check_writable_file
from dpkit.eval import pusht
from dpkit.eval import lerobot_protocol
from dpkit.eval.latency import evaluate_latency
from dpkit.eval.protocol import (MAX_ENVS, OBS_KEYS, Policy, check_blend, check_policy, env_count,  # noqa: F401
                                 policy_fields, protocol_fields)
from dpkit.runtime import BACKENDS
from dpkit.runtime.realtime import EXECUTIONS
from dpkit.threads import choose_threads


class RandomPolicy:
    """The baseline: every action an independent uniform target in [0, 512]^2."""

    backend = "random"
    max_batch = None

    def __init__(self, obs_mode: str = "lowdim", n_obs_steps: int = 2, n_action_steps: int = 8):
        if obs_mode not in OBS_KEYS:
            raise DpkitError(f"unknown observation mode {obs_mode!r}")
        self.obs_mode = obs_mode
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.obs_keys = OBS_KEYS[obs_mode]

    def predict_action(self, obs: dict[str, np.ndarray], sampler: str | None = None, steps: int | None = None, *,
                       seed: int | None = None) -> np.ndarray:
        """Uniform targets; `sampler` and `steps` are accepted and mean nothing here."""
        batch = len(obs[self.obs_keys[0]])
        return np.random.default_rng(seed).uniform(0.0, 512.0, size=(batch, self.n_action_steps, 2))


@dataclasses.dataclass
class _Episode:
    index: int
    seed: int
    history: dict[str, collections.deque]
    frames: list[np.ndarray] | None
    max_reward: float = 0.0
    steps: int = 0
    success: bool = False


def _start(env: Any, policy: Any, index: int, seed: int, record: bool) -> _Episode:
    raw = pusht.reset_legacy(env, seed)
    first = pusht.observe(env, policy.obs_mode, raw, policy.obs_keys)
    # As the original: the history starts as the first observation repeated To times.
    history = {k: collections.deque([v] * policy.n_obs_steps, maxlen=policy.n_obs_steps) for k, v in first.items()}
    frames = [pusht.render_frame(env, pusht.coverage(env), 0, seed)] if record else None
    return _Episode(index=index, seed=seed, history=history, frames=frames)


def _encode_video(frames: list[np.ndarray], stem: Path) -> tuple[Path, bytes]:
    """MP4 when imageio's ffmpeg plugin is installed, else GIF: (path with its suffix, file bytes)."""
    import imageio.v3 as iio

    try:
        import imageio_ffmpeg  # noqa: F401

        path, kwargs = stem.with_suffix(".mp4"), {"fps": 10}
    except ImportError:
        path, kwargs = stem.with_suffix(".gif"), {"duration": 100, "loop": 0}  # 10 Hz, like the env
    return path, iio.imwrite("<bytes>", np.stack(frames), extension=path.suffix, **kwargs)


def evaluate_policy(
    policy: Any,
    episodes: int = pusht.N_TEST_EPISODES,
    seed_start: int = pusht.LEGACY_TEST_SEED,
    max_steps: int = pusht.MAX_STEPS,
    n_envs: int | None = None,
    video_dir: str | os.PathLike | None = None,
    n_videos: int = 4,
    progress: bool = True,
    sampler: str | None = None,
    steps: int | None = None,
    sample_seed: int = 0,
) -> dict[str, Any]:
    """Roll `policy` out on episodes seeded `seed_start .. seed_start + episodes - 1`; returns the report.

    n_envs: environments stepped together (see env_count); a free one takes the next
    episode. sampler, steps: the reverse process (None: the policy's default). Chunk c is sampled with
    `seed` = a hash of (sample_seed, c), so the same policy, backend, seeds and n_envs give the same
    report. Videos of the first `n_videos` episodes go to `video_dir` when given.
    """
    check_policy(policy)
    if episodes < 1:
        raise DpkitError(f"episodes must be >= 1, got {episodes}")
    if max_steps < 1:
        raise DpkitError(f"max_steps must be >= 1, got {max_steps}")
    if not 0 <= seed_start <= 2**32 - 1 - episodes:
        raise DpkitError(f"seed_start must be in [0, 2**32 - episodes), got {seed_start}")
    n_envs = env_count(policy, episodes, n_envs)
    video_dir = Path(video_dir) if video_dir is not None else None
    n_videos = n_videos if video_dir is not None else 0

    from tqdm import tqdm

    t_start = time.perf_counter()
    mode, to, ta = policy.obs_mode, int(policy.n_obs_steps), int(policy.n_action_steps)
    envs = [pusht.make_env(mode) for _ in range(n_envs)]
    pending = collections.deque(range(episodes))
    running: dict[int, _Episode] = {}  # env slot -> its episode
    finished: list[_Episode] = []
    videos: list[tuple[Path, bytes]] = []  # written only once every episode is done
    latencies: list[float] = []
    bar = tqdm(total=episodes * max_steps, unit="step", desc=f"eval {getattr(policy, 'backend', '')}".strip(),
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        while pending or running:
            for slot in range(n_envs):
                if slot not in running and pending:
                    i = pending.popleft()
                    running[slot] = _start(envs[slot], policy, i, seed_start + i, record=i < n_videos)
            slots = sorted(running)
            obs = {
                k: np.stack([np.stack(running[s].history[k]) for s in slots]).astype(np.float32, copy=False)
                for k in policy.obs_keys
            }
            chunk_seed = int(np.random.SeedSequence([sample_seed, len(latencies)]).generate_state(1)[0])
            t0 = time.perf_counter()
            actions = np.asarray(policy.predict_action(obs, sampler, steps, seed=chunk_seed))
            latencies.append(time.perf_counter() - t0)
            if actions.ndim != 3 or actions.shape[0] != len(slots) or actions.shape[1] < ta or actions.shape[2] != 2:
                raise DpkitError(f"policy returned actions of shape {actions.shape}, expected ({len(slots)}, {ta}, 2)")
            if not np.all(np.isfinite(actions[:, :ta])):
                raise DpkitError("policy returned non-finite actions")
            for row, slot in enumerate(slots):
                ep, env = running[slot], envs[slot]
                steps_before = ep.steps
                for action in actions[row, :ta]:
                    raw, reward, terminated, _, info = env.step(action.astype(np.float64))
                    ep.steps += 1
                    ep.max_reward = max(ep.max_reward, float(reward))
                    for k, v in pusht.observe(env, mode, raw, policy.obs_keys).items():
                        ep.history[k].append(v)
                    if ep.frames is not None:
                        ep.frames.append(pusht.render_frame(env, float(info["coverage"]), ep.steps, ep.seed))
                    if terminated or ep.steps >= max_steps:
                        ep.success = bool(info["is_success"])
                        break
                bar.update(ep.steps - steps_before)
                if ep.success or ep.steps >= max_steps:
                    bar.update(max_steps - ep.steps)  # the rest of a successful episode is skipped
                    del running[slot]
                    finished.append(ep)
                    if ep.frames is not None:
                        stem = video_dir / f"episode{ep.index:03d}_seed{ep.seed}"
                        videos.append(_encode_video(ep.frames, stem))
                        ep.frames = None
                    bar.set_postfix(done=len(finished), score=f"{np.mean([e.max_reward for e in finished]):.3f}")
    finally:
        bar.close()
        for env in envs:
            env.close()

    for path, data in videos:
        atomic_write_bytes(path, data)
    finished.sort(key=lambda e: e.index)
    rewards = [e.max_reward for e in finished]
    report = {
        "score": float(np.mean(rewards)),
        "success_rate": float(np.mean([e.success for e in finished])),
        **policy_fields(policy, mode, to, ta, latencies),
        **protocol_fields(episodes, seed_start, max_steps, n_envs, sample_seed, t_start),
        "videos": [str(path) for path, _ in videos],
        "episodes": [
            {"seed": e.seed, "max_reward": e.max_reward, "steps": e.steps, "success": e.success} for e in finished
        ],
    }
    if sampler is not None or steps is not None:
        report["sampler"], report["steps"] = sampler, steps
    return report


# ---------------------------------------------------------------------------------------------------
# CLI


def rollout_evaluator(cfg: Any) -> Any:
    """`evaluate(policy) -> {sampler label: report}` for the trainer: an in-memory DiffusionPolicy rolled
    out on `train.eval_episodes` legacy seeds for `train.eval_max_steps` steps with each sampler of
    `train.eval_samplers` (empty: the policy's default), through the same "torch" backend and
    `evaluate_policy` that `dpkit-eval --checkpoint` uses. Each report is dpkit-eval's, minus the
    per-episode rows."""
    from dpkit.runtime.torch_policy import TorchPolicy
    from dpkit.sampling_args import parse_sampler_label, sampler_label

    samplers = [parse_sampler_label(v) for v in cfg.train.eval_samplers]

    def evaluate(policy: Any) -> dict[str, dict[str, Any]]:
        wrapped = TorchPolicy(policy=policy)
        if not samplers:
            choice = wrapped.resolve_sampler()
            runs = [(None, None, sampler_label(choice.sampler, choice.num_inference_steps))]
        else:
            runs = [(kind, k, sampler_label(kind, k)) for kind, k in samplers]
        out = {}
        for kind, k, label in runs:
            report = evaluate_policy(wrapped, episodes=cfg.train.eval_episodes, max_steps=cfg.train.eval_max_steps,
                                     progress=False, sampler=kind, steps=k)
            out[label] = {key: v for key, v in report.items() if key not in ("episodes", "videos")}
        return out

    return evaluate


class RecordingPolicy:
    """A policy that keeps every observation batch it is asked to act on (rows in the order seen), e.g. the
    states a rollout visits (distillation's on-policy windows, dpkit.benchmarks.fewstep_spread)."""

    def __init__(self, policy: Any):
        self._policy = policy
        self.seen: list[dict[str, np.ndarray]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def predict_action(self, obs: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> np.ndarray:
        self.seen.append({k: np.array(v, dtype=np.float32) for k, v in obs.items()})
        return self._policy.predict_action(obs, *args, **kwargs)

    def windows(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([o[k] for o in self.seen]) for k in self.seen[0]}


def window_collector(cfg: Any) -> Any:
    """`collect(policy, r) -> (windows, report)` for distillation's on-policy states (distill.rollout_at):
    the in-memory student rolled out with fewstep-`distill.rollout_calls` on round r's
    `distill.rollout_episodes` legacy start states (seeds `rollout_seed_start + r * rollout_episodes` on,
    below the test seeds), through the same "torch" backend and `evaluate_policy` as the trainer's rollout
    evaluations. `windows`: {observation name: (N, To, ...)}, every window the student acted on; `report`:
    dpkit-eval's, minus the per-episode rows."""
    from dpkit.runtime.torch_policy import TorchPolicy

    d = cfg.distill

    def collect(policy: Any, r: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        recording = RecordingPolicy(TorchPolicy(policy=policy))
        report = evaluate_policy(recording, episodes=d.rollout_episodes,
                                 seed_start=d.rollout_seed_start + r * d.rollout_episodes, progress=False,
                                 sampler="fewstep", steps=d.rollout_calls, sample_seed=r)
        return recording.windows(), {k: v for k, v in report.items() if k not in ("episodes", "videos")}

    return collect


PROTOCOLS = ("original", "lerobot")
"""dpkit-eval --protocol: the original paper's (the default) and lerobot-eval's (dpkit.eval.lerobot_protocol)."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a DpkitError (one line, via cli_entry) instead of usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise DpkitError(f"{message} (see dpkit-eval --help)")


def _parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="dpkit-eval", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH_OR_RUN_DIR", help="a training checkpoint or run folder (backend torch)")
    src.add_argument("--bundle", metavar="DIR", help="an exported bundle (backend ort or cpp)")
    src.add_argument("--random", action="store_true", help="the uniform random baseline")
    p.add_argument("--backend", help="torch (checkpoint) | ort | cpp (bundle); default: torch for a checkpoint, cpp for a bundle")
    p.add_argument("--protocol", choices=PROTOCOLS, default="original",
                   help="original: the Diffusion Policy paper's (legacy seeds, max coverage); lerobot: lerobot-eval's "
                        "(its seeds, batches and metrics); default %(default)s")
    p.add_argument("--episodes", type=int, default=None,
                   help=f"default {pusht.N_TEST_EPISODES} ({lerobot_protocol.N_EPISODES} with --protocol lerobot)")
    p.add_argument("--seed-start", type=int, default=None,
                   help=f"default {pusht.LEGACY_TEST_SEED} ({lerobot_protocol.SEED} with --protocol lerobot)")
    p.add_argument("--max-steps", type=int, default=pusht.MAX_STEPS,
                   help="environment steps per episode at most (default %(default)s; not denoising steps: --num-steps)")
    p.add_argument("--n-envs", type=int, default=None, help=f"environments stepped together (default min(episodes, {MAX_ENVS}))")
    p.add_argument("--sample-seed", type=int, default=0, metavar="N",
                   help="seed of the sampling noise (chunk c draws from a hash of N and c; default %(default)s): "
                        "another N scores the same start states with fresh noise")
    add_sampler_args(p, steps_alias=True)  # --sampler ddim | ddim-10, --num-steps K (older name: --steps)
    p.add_argument("--video-dir", metavar="DIR", help="write rollout videos of the first --n-videos episodes here")
    p.add_argument("--n-videos", type=int, default=4, help="default %(default)s")
    p.add_argument("--latency-steps", type=int, default=None, metavar="D",
                   help="simulate an inference delay of D environment steps (the simulator runs on while a chunk is "
                        "computed)")
    p.add_argument("--execution", choices=EXECUTIONS, default=None,
                   help="with --latency-steps: sync | async | async-inpaint (default async-inpaint)")
    p.add_argument("--blend", type=int, default=0, help="async-inpaint: steps of decaying blend after the prefix")
    add_common_args(p, quiet_alias=True, json="write the report here")  # --threads, --no-progress (= --quiet),
    # --json PATH, --version
    return p


def _validate(args: argparse.Namespace) -> None:
    lerobot = args.protocol == "lerobot"
    if args.episodes is None:
        args.episodes = lerobot_protocol.N_EPISODES if lerobot else pusht.N_TEST_EPISODES
    if args.seed_start is None:
        args.seed_start = lerobot_protocol.SEED if lerobot else pusht.LEGACY_TEST_SEED
    if lerobot and (args.latency_steps is not None or args.execution is not None or args.blend):
        raise DpkitError("--protocol lerobot takes no --latency-steps, --execution or --blend")
    if lerobot and args.video_dir:
        raise DpkitError("--protocol lerobot writes no videos: drop --video-dir")
    if args.episodes < 1:
        raise DpkitError(f"--episodes must be >= 1, got {args.episodes}")
    if args.max_steps < 1:
        raise DpkitError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.n_envs is not None and args.n_envs < 1:
        raise DpkitError(f"--n-envs must be >= 1, got {args.n_envs}")
    if not 0 <= args.seed_start <= 2**32 - 1 - args.episodes:
        raise DpkitError(f"--seed-start must be in [0, 2**32 - episodes), got {args.seed_start}")
    if args.n_videos < 0:
        raise DpkitError(f"--n-videos must be >= 0, got {args.n_videos}")
    if args.sample_seed < 0:
        raise DpkitError(f"--sample-seed must be >= 0, got {args.sample_seed}")
    resolve_sampler_args(args)  # a label --sampler ddim-10 is split; K checked
    args.steps = args.num_steps  # K, under the name the evaluation code below passes on as steps=
    if args.latency_steps is not None or args.execution is not None:
        if args.latency_steps is None:
            args.latency_steps = 0
        if args.execution is None:
            args.execution = "async-inpaint"
        if args.latency_steps < 0:
            raise DpkitError(f"--latency-steps must be >= 0, got {args.latency_steps}")
        if args.video_dir:
            raise DpkitError("--video-dir is not available with --latency-steps/--execution")
        if args.random:
            raise DpkitError("--random takes no --latency-steps or --execution")
    check_blend(args.blend, args.execution, args.latency_steps, ("--blend", "--execution", "--latency-steps"))
    if args.random:
        if args.backend is not None or args.sampler is not None or args.steps is not None:
            raise DpkitError("--random takes no --backend, --sampler or --steps")
        return
    if args.backend is None:
        args.backend = "torch" if args.checkpoint else "cpp"
    if args.backend not in BACKENDS:
        raise DpkitError(f"unknown backend {args.backend!r} (expected one of {', '.join(BACKENDS)})")
    if args.checkpoint:
        if args.backend != "torch":
            raise DpkitError(f"a checkpoint runs with --backend torch; export it (dpkit-export) to use {args.backend}")
        if not Path(args.checkpoint).exists():
            raise DpkitError(f"checkpoint {args.checkpoint} does not exist")
    else:
        if args.backend == "torch":
            raise DpkitError("a bundle runs with --backend ort or cpp; use --checkpoint for torch")
        if not (Path(args.bundle) / "policy.json").is_file():
            raise DpkitError(f"{args.bundle} is not a bundle: {Path(args.bundle) / 'policy.json'} is missing")


def _load(args: argparse.Namespace) -> Any:
    if args.random:
        return RandomPolicy()
    try:
        from dpkit.runtime import load_policy
    except ImportError as e:
        raise DpkitError(f"dpkit.runtime.load_policy is not available: {e}") from None
    options = {"threads": args.threads or None}  # None: dpkit.threads' choice for the model (the same rule)
    if args.backend == "cpp":  # its buffers are preallocated: size them for the vectorized batch
        options["max_batch"] = min(args.episodes, args.n_envs or MAX_ENVS)
    return load_policy(args.checkpoint or args.bundle, backend=args.backend, **options)


def _threads_json(policy: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The backend's thread choice (the random baseline has none: what the rule would say, for the record)."""
    choice = getattr(policy, "threads", None)
    return (choice if choice is not None else choose_threads(args.threads)).to_json()


def format_summary(report: dict[str, Any]) -> str:
    n = report["n_episodes"]
    wins = sum(e["success"] for e in report["episodes"])
    first = report["seed_start"]
    rows = [
        ("backend", f"{report['backend']} ({report['obs_mode']}, To={report['n_obs_steps']}, Ta={report['n_action_steps']})"),
        ("episodes", f"{n} (seeds {first}..{first + n - 1}, at most {report['max_steps']} steps, {report['n_envs']} envs)"),
        ("score", f"{report['score']:.3f}  (mean of each episode's max reward)"),
        ("success rate", f"{report['success_rate']:.3f}  ({wins}/{n} with coverage > {pusht.SUCCESS_COVERAGE})"),
        ("chunk latency", f"{report['mean_chunk_latency_ms']:.2f} ms mean over {report['n_chunks']} batched calls"),
        *([("execution", f"{report['execution']}, delay {report['latency_steps']} steps: "
                         f"{report['deadline_misses']} deadline misses, {report['wait_ticks']} hold steps"),
           ("action jump", f"{_px(report['mean_jump_at_switch_px'])} at chunk switches, "
                           f"{_px(report['mean_jump_inside_px'])} inside chunks (mean |a_t - a_t-1|)")]
          if "execution" in report else []),
        ("wall time", f"{report['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _px(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} px"


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    apply_threads(args)
    _validate(args)
    # Fail on unwritable outputs before the long run, not after it.
    if args.json:
        check_writable_file(args.json)
    if args.video_dir:
        check_writable_dir(args.video_dir, "video folder")
    policy = _load(args)
    if args.protocol == "lerobot":
        report = lerobot_protocol.evaluate_lerobot(
            policy, episodes=args.episodes, seed_start=args.seed_start, max_steps=args.max_steps,
            n_envs=args.n_envs, progress=not args.no_progress, sampler=args.sampler, steps=args.steps,
            sample_seed=args.sample_seed)
        report["threads"] = _threads_json(policy, args)
        print(lerobot_protocol.format_summary(report))
        if args.json:
            atomic_write_json(args.json, report)
            print(f"report          {args.json}")
        return 0
    if args.execution is not None:
        report = evaluate_latency(policy, args.latency_steps, args.execution, args.blend, episodes=args.episodes,
                                  seed_start=args.seed_start, max_steps=args.max_steps, n_envs=args.n_envs,
                                  progress=not args.no_progress, sampler=args.sampler, steps=args.steps,
                                  sample_seed=args.sample_seed)
        report["threads"] = _threads_json(policy, args)
        print(format_summary(report))
        if args.json:
            atomic_write_json(args.json, report)
            print(f"report        {args.json}")
        return 0
    report = evaluate_policy(
        policy,
        episodes=args.episodes,
        seed_start=args.seed_start,
        max_steps=args.max_steps,
        n_envs=args.n_envs,
        video_dir=args.video_dir,
        n_videos=args.n_videos,
        progress=not args.no_progress,
        sampler=args.sampler,
        steps=args.steps,
        sample_seed=args.sample_seed,
    )
    report["threads"] = _threads_json(policy, args)
    print(format_summary(report))
    for v in report["videos"]:
        print(f"video         {v}")
    if args.json:
        atomic_write_json(args.json, report)
        print(f"report        {args.json}")
    return 0


if __name__ == "__main__":
    main()
