"""How much of the teacher's action distribution a few-step student keeps, at the states a rollout visits.

    python -m dpkit.benchmarks.fewstep_spread --teacher bundles/teacher --student bundles/student \\
        --states 40 --samples 256 --json spread.json

A student that regresses onto the teacher's ODE map can score close to its teacher on average and still lose
whole episodes: where the teacher's actions split into modes (go round the block left or right), a
mean-squared fit pulls its samples toward their middle. This measures that directly. The teacher (DDPM-100)
drives `--states` decision states (the observations it acts on in the first `--chunks` chunks of episodes
from legacy seed `--seed-start` on); at each, `--samples` chunks are sampled from one observation with every
sampler, and the spread is the root-mean-square distance of the executed actions from their mean, in pixels. Reported per
sampler: the mean spread, its ratio to the teacher DDPM-100's at the same states, and how far the sampler's
mean action lies from the teacher's (px). C++ runtime, fp32 bundles.

With `--goal-distance LO,HI` (low-dim teachers) the states are instead those of `--episodes` whole DDPM-100
episodes whose block lies LO to HI px from the goal (the mean distance of the dataset's 9 keypoints from
theirs at the goal pose), `--states` of them spread evenly over the episodes' order: e.g. 0,15 for the final
alignment, where a closed-loop rollout spends about half of its decisions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.cli_args import add_common_args, apply_threads
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_json, check_writable_file

TEACHER_SAMPLERS = (("ddpm", 100), ("ddim", 10), ("ddim", 20))  # those the teacher's bundle lists


def decision_states(teacher: Any, n_states: int, chunks: int, seed_start: int) -> list[dict[str, np.ndarray]]:
    """`n_states` observation windows (To, ...) the teacher's DDPM-100 acts on in the first `chunks` chunks of
    episodes from legacy seed `seed_start` on (dpkit-eval's rollout, recorded)."""
    from dpkit.eval.evaluate import RecordingPolicy, evaluate_policy

    episodes = -(-n_states // chunks)
    while True:  # an episode that succeeds early asks for fewer chunks: then take one more episode
        recording = RecordingPolicy(teacher)
        evaluate_policy(recording, episodes=episodes, seed_start=seed_start,
                        max_steps=chunks * int(teacher.n_action_steps), progress=False, sampler="ddpm", steps=100)
        windows = recording.windows()
        if len(next(iter(windows.values()))) >= n_states:
            return [{k: v[i] for k, v in windows.items()} for i in range(n_states)]
        episodes += 1


def goal_distance(obs: np.ndarray) -> np.ndarray:
    """(N,) px: the mean distance of the block's 9 keypoints in each low-dim window's current observation
    (obs (N, To, 20): 9 keypoints, then the agent) from the same keypoints at the goal pose."""
    from dpkit.eval.pusht import GOAL_POSE, block_keypoints

    goal = block_keypoints(np.array(GOAL_POSE))
    keypoints = np.asarray(obs, dtype=np.float64)[:, -1, :18].reshape(-1, 9, 2)
    return np.sqrt(((keypoints - goal) ** 2).sum(-1)).mean(-1)


def goal_states(teacher: Any, n_states: int, band: tuple[float, float], episodes: int,
                seed_start: int) -> tuple[list[dict[str, np.ndarray]], int, int]:
    """(states, seen, in band): up to `n_states` observation windows the teacher's DDPM-100 acts on in
    `episodes` whole episodes from legacy seed `seed_start` on whose block lies band[0] <= d < band[1] px from
    the goal (goal_distance), evenly spaced over the order they were seen; with the number of windows seen and
    of those in the band. A clear error when there are none."""
    from dpkit.eval.evaluate import RecordingPolicy, evaluate_policy

    if teacher.obs_mode != "lowdim":
        raise DpkitError("--goal-distance needs a low-dim teacher (its observation holds the block's keypoints)")
    recording = RecordingPolicy(teacher)
    evaluate_policy(recording, episodes=episodes, seed_start=seed_start, progress=False, sampler="ddpm", steps=100)
    windows = recording.windows()
    d = goal_distance(windows["obs"])
    rows = np.flatnonzero((d >= band[0]) & (d < band[1]))
    if len(rows) == 0:
        raise DpkitError(f"none of the {len(d)} states of {episodes} teacher episodes lies {band[0]:g} to "
                         f"{band[1]:g} px from the goal (their distances: {d.min():.1f} to {d.max():.1f} px)")
    pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(n_states, len(rows))).round().astype(int))]
    return [{k: v[i] for k, v in windows.items()} for i in pick], len(d), len(rows)


def _band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI in px, got {text!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO < HI, got {text!r}")
    return lo, hi


def spread(policies: dict[str, tuple[Any, str, int]], states: list[dict[str, np.ndarray]], samples: int) -> dict:
    """Per sampler label: (spread per state (px), mean executed action per state (n, Ta, 2))."""
    out: dict[str, Any] = {}
    for label, (policy, kind, k) in policies.items():
        spreads, means = [], []
        for i, obs in enumerate(states):
            batch = {key: np.repeat(v[None], samples, axis=0).astype(np.float32) for key, v in obs.items()}
            a = np.asarray(policy.predict_action(batch, kind, k, seed=i), dtype=np.float64)  # (S, Ta, 2)
            mean = a.mean(axis=0)
            spreads.append(float(np.sqrt(((a - mean) ** 2).sum(-1).mean())))
            means.append(mean)
        out[label] = (np.array(spreads), np.stack(means))
    return out


def summarize(raw: dict[str, Any], reference: str = "ddpm-100") -> dict[str, dict[str, float]]:
    ref_spread, ref_mean = raw[reference]
    return {label: {"spread_px": float(s.mean()), "of_teacher_ddpm100": float(s.mean() / ref_spread.mean()),
                    "median_ratio": float(np.median(s / np.maximum(ref_spread, 1e-9))),
                    "mean_offset_px": float(np.sqrt(((m - ref_mean) ** 2).sum(-1)).mean())}
            for label, (s, m) in raw.items()}


def _listed(bundle: str) -> set[tuple[str, int]]:
    """The (sampler, steps) pairs a bundle lists, as the one bundle reader accepted them."""
    from dpkit.runtime.bundle import load_bundle

    return {(s.sampler, s.num_inference_steps) for s in load_bundle(bundle, verify_sha256=False).schedule.samplers}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fewstep_spread", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's bundle")
    p.add_argument("--student", action="append", required=True, help="a student's bundle (repeat for more)")
    p.add_argument("--states", type=int, default=40)
    p.add_argument("--chunks", type=int, default=8, help="decision states per episode (default %(default)s)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seed-start", type=int, default=0, help="first legacy seed (default 0: not the test seeds)")
    p.add_argument("--goal-distance", type=_band, metavar="LO,HI",
                   help="the states of whole episodes whose block lies LO to HI px from the goal (low-dim)")
    p.add_argument("--episodes", type=int, default=12, help="whole episodes with --goal-distance (default %(default)s)")
    add_common_args(p, progress=False, json="write the result here")  # --threads, --json, --version
    args = p.parse_args(argv)
    threads = apply_threads(args) or None  # None: dpkit.threads' choice for the model
    if args.states < 1 or args.chunks < 1 or args.samples < 2 or args.episodes < 1:
        raise DpkitError("--states, --chunks and --episodes must be >= 1 and --samples >= 2")
    if args.json:
        check_writable_file(args.json)
    from dpkit.runtime import load_policy

    teacher = load_policy(args.teacher, backend="cpp", threads=threads, max_batch=args.samples)
    have = _listed(args.teacher)
    if ("ddpm", 100) not in have:
        raise DpkitError(f"{args.teacher}: the teacher's bundle lists no ddpm-100, the reference spread")
    policies = {f"{kind}-{k}": (teacher, kind, k) for kind, k in TEACHER_SAMPLERS if (kind, k) in have}
    for path in args.student:
        student = load_policy(path, backend="cpp", threads=threads, max_batch=args.samples)
        calls = sorted(k for kind, k in _listed(path) if kind == "fewstep")
        if not calls:
            raise DpkitError(f"{path}: not a few-step student's bundle (no fewstep sampler in its policy.json)")
        for k in calls:
            policies[f"{Path(path).name} fewstep-{k}"] = (student, "fewstep", k)
    t0 = time.perf_counter()
    if args.goal_distance:
        states, seen, in_band = goal_states(teacher, args.states, args.goal_distance, args.episodes, args.seed_start)
        print(f"{in_band} of the {seen} states of {args.episodes} episodes lie in the band: {len(states)} taken")
    else:
        states = decision_states(teacher, args.states, args.chunks, args.seed_start)
    result = {"teacher": args.teacher, "students": args.student, "states": len(states), "chunks": args.chunks,
              "samples": args.samples, "seed_start": args.seed_start,
              "samplers": summarize(spread(policies, states, args.samples))}
    if args.goal_distance:
        result.update(goal_distance_px=list(args.goal_distance), episodes=args.episodes, states_seen=seen,
                      states_in_band=in_band)
    result["wall_s"] = time.perf_counter() - t0
    print(f"{'sampler':32s} {'spread px':>10s} {'of DDPM-100':>12s} {'median ratio':>13s} {'mean offset px':>15s}")
    for label, r in result["samplers"].items():
        print(f"{label:32s} {r['spread_px']:10.1f} {100 * r['of_teacher_ddpm100']:11.0f} % "
              f"{r['median_ratio']:13.2f} {r['mean_offset_px']:15.1f}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    main()
