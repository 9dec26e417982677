"""PushT score under inference latency: sync vs async vs async-inpaint for d = 0, 1, 2, ... steps.

    python -m dpkit.benchmarks.bench_latency_eval --bundle bundles/tiny --name demo
    python -m dpkit.benchmarks.bench_latency_eval --bundle B --delays 0 1 2 3 4 6 --episodes 50 --backend cpp

For each delay d and execution mode it runs the 50 legacy seeds with the simulator advancing d steps while
a chunk is computed (dpkit.eval.latency: same seeds, same noise per request, virtual clock), and writes
`benchmarks/results/latency_eval/<name>.{json,md,png}`: score, success rate, deadline misses / hold steps
and the mean action jump at chunk switches vs inside chunks.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.benchmarks.report import png_bytes, pyplot, write_report
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import check_writable_file

MODES = ("sync", "async", "async-inpaint")


def run(bundle: Path, backend: str, delays: list[int], episodes: int, sampler: str | None, steps: int | None,
        blend: int, progress: bool) -> dict[str, Any]:
    from dpkit.eval.evaluate import MAX_ENVS
    from dpkit.eval.latency import evaluate_latency
    from dpkit.runtime import load_policy

    options = {"max_batch": min(episodes, MAX_ENVS)} if backend == "cpp" else {}
    policy = load_policy(bundle, backend=backend, **options)
    rows = []
    t0 = time.perf_counter()
    for d in delays:
        for mode in MODES:
            r = evaluate_latency(policy, d, mode, blend if mode == "async-inpaint" else 0, episodes=episodes,
                                 sampler=sampler, steps=steps, progress=progress)
            rewards = np.array([e["max_reward"] for e in r["episodes"]])
            rows.append({"delay": d, "execution": mode, "score": r["score"],
                         "score_sem": float(rewards.std(ddof=1) / np.sqrt(len(rewards))) if len(rewards) > 1 else None,
                         "success_rate": r["success_rate"], "deadline_misses": r["deadline_misses"],
                         "wait_ticks": r["wait_ticks"], "jump_switch_px": r["mean_jump_at_switch_px"],
                         "jump_inside_px": r["mean_jump_inside_px"], "n_chunks": r["n_chunks"], "sampler": r["sampler"],
                         "wall_s": r["wall_s"]})
            print(f"d={d} {mode:<14} score {r['score']:.3f} success {r['success_rate']:.2f} "
                  f"misses {r['deadline_misses']} jump switch/inside {r['mean_jump_at_switch_px']}/"
                  f"{r['mean_jump_inside_px']}", file=sys.stderr)
    return {"format": "dpkit-latency-eval", "format_version": 1, "bundle": str(bundle), "backend": backend,
            "episodes": episodes, "blend": blend, "rows": rows, "elapsed_s": round(time.perf_counter() - t0, 1),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "python": platform.python_version()}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# PushT under inference latency ({result['bundle']}, {result['backend']}, {result['episodes']} legacy "
             f"seeds, blend {result['blend']})", "",
             "| d | execution | score ± s.e. | success | misses / holds | jump at switch | jump inside |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sem = f" ± {r['score_sem']:.3f}" if r["score_sem"] is not None else ""
        js = "–" if r["jump_switch_px"] is None else f"{r['jump_switch_px']:.1f} px"
        ji = "–" if r["jump_inside_px"] is None else f"{r['jump_inside_px']:.1f} px"
        lines.append(f"| {r['delay']} | {r['execution']} | {r['score']:.3f}{sem} | {r['success_rate']:.2f} | "
                     f"{r['deadline_misses']} / {r['wait_ticks']} | {js} | {ji} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> bytes:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for mode in MODES:
        rows = [r for r in result["rows"] if r["execution"] == mode]
        ax.errorbar([r["delay"] for r in rows], [r["score"] for r in rows],
                    yerr=[r["score_sem"] or 0 for r in rows], marker="o", capsize=3, label=mode)
    ax.set_xlabel("inference delay d (steps at 10 Hz)")
    ax.set_ylabel(f"score ({result['episodes']} legacy seeds)")
    ax.set_title("PushT score vs inference latency")
    ax.grid(alpha=0.3)
    ax.legend()
    return png_bytes(fig)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_latency_eval", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--name", default="latency_eval", help="file stem of the results")
    p.add_argument("--backend", default="ort", choices=("ort", "cpp"))
    p.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--blend", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/latency_eval"))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if any(d < 0 for d in a.delays) or a.episodes < 1 or a.blend < 0:
        raise DpkitError("--delays, --episodes and --blend must be non-negative (episodes >= 1)")
    if not (a.bundle / "policy.json").is_file():
        raise DpkitError(f"{a.bundle} is not a bundle (no policy.json)")
    stem = a.out_dir / a.name
    check_writable_file(stem.with_suffix(".json"))
    result = run(a.bundle, a.backend, sorted(set(a.delays)), a.episodes, a.sampler, a.steps, a.blend, not a.no_progress)
    write_report(stem, result, markdown(result), plot(result))
    return 0


if __name__ == "__main__":
    main()
