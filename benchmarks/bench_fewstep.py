"""Few-step students against their teachers: score on the same seeds, and distillation's CPU cost.

    python -m dpkit.benchmarks.bench_fewstep --pair runs/teacher_s42 runs/student_s42 \\
        --pair runs/teacher_s43 runs/student_s43 --episodes 200 --out benchmarks/results/fewstep

For each (teacher run, student run): both are exported (fp32 bundles), then dpkit-eval scores, in the C++
runtime, the teacher with DDPM-100 and DDIM-10 and the student with fewstep-1 and fewstep-2 (fewstep-1 alone
for a student distilled with one timestep) on the same legacy seeds (100000 on). A student's figure is given
as a fraction of its teacher's DDPM-100 score with the paired standard error of the per-episode difference
(the same seed's start state on both sides). The cost is
the student's distillation CPU time over its teacher's training CPU time (each run's train_summary.json,
same machine). Pairs run one process each, side by side, with one thread each.

A 200-episode score moves with the sampling noise alone (dpkit-eval --sample-seed): `--sample-seeds N` scores
every sampler with sample seeds 0..N-1 (DDPM-100, by far the costliest, with `--ddpm-sample-seeds M`, default
N) on the same start states. Each row then gives the mean over sample seeds, their standard deviation, and the
differences (from DDPM-100 and from DDIM-10) of each start state's mean reward, with paired standard errors.
Evaluations already in `--out`/evals are reused (sample seed n > 0 is `NAME_SAMPLER_n{n}.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_json, atomic_write_text

TEACHER_SAMPLERS = ("ddpm-100", "ddim-10")
STUDENT_SAMPLERS = ("fewstep-1", "fewstep-2")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise DpkitError(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")


def _bundle(run: Path, out: Path) -> Path:
    if not (out / "policy.json").exists():
        _run([sys.executable, "-m", "dpkit.export.cli", str(run), "--out", str(out), "--no-progress", "--threads", "1"])
    return out


def _evaluate(bundle: Path, sampler: str, episodes: int, out: Path, latency_steps: int | None = None,
              sample_seed: int = 0) -> dict:
    if not out.exists():
        delay = ["--latency-steps", str(latency_steps)] if latency_steps is not None else []
        _run([sys.executable, "-m", "dpkit.eval.evaluate", "--bundle", str(bundle), "--backend", "cpp",
              "--sampler", sampler, "--episodes", str(episodes), "--seed-start", "100000", "--threads", "1",
              "--sample-seed", str(sample_seed), "--no-progress", "--json", str(out), *delay])
    report = json.loads(out.read_text())
    if report.get("sample_seed", 0) != sample_seed or report["n_episodes"] != episodes:
        raise DpkitError(f"{out} is an evaluation of {report['n_episodes']} episodes at sample seed "
                         f"{report.get('sample_seed', 0)}, not {episodes} at {sample_seed}: move it away")
    return report


def _evaluations(bundle: Path, sampler: str, episodes: int, work: Path, name: str, seeds: int) -> list[dict]:
    """One evaluation per sample seed 0..seeds-1 (seed 0 keeps the single-evaluation file name)."""
    return [_evaluate(bundle, sampler, episodes, work / (f"{name}_{sampler}.json" if n == 0 else
                                                         f"{name}_{sampler}_n{n}.json"), sample_seed=n)
            for n in range(seeds)]


def _under_latency(teacher: Path, student: Path, delays: list[int], episodes: int, work: Path, cache: Path) -> dict:
    """Scores under a fixed inference delay of d environment steps (dpkit-eval --latency-steps d, its default
    execution async-inpaint): the teacher's DDIM-10 against the student's fewstep-1 and fewstep-2."""
    bundles = {"ddim-10": cache / f"{teacher.name}_bundle"}
    bundles |= {s: cache / f"{student.name}_bundle" for s in _student_samplers(student)}
    rows = {}
    for sampler, bundle in bundles.items():
        owner = teacher.name if sampler == "ddim-10" else student.name
        rows[sampler] = {d: _evaluate(bundle, sampler, episodes, work / f"{owner}_{sampler}_latency{d}.json", d)["score"]
                         for d in delays}
    return {"teacher": str(teacher), "student": str(student), "episodes": episodes, "scores": rows}


def _student_samplers(student: Path) -> tuple[str, ...]:
    """The STUDENT_SAMPLERS the student samples with: fewstep-k for k up to its distill.timesteps (a student
    distilled with one timestep has fewstep-1 alone), from its latest checkpoint's config."""
    from dpkit.train.checkpoint import latest_checkpoint, read_state

    ckpt = latest_checkpoint(student)
    if ckpt is None:
        raise DpkitError(f"{student} has no checkpoint: is it a dpkit-distill run folder?")
    calls = len(read_state(ckpt)["config"].get("policy", {}).get("fewstep_timesteps") or ())
    if calls == 0:
        raise DpkitError(f"{student} is not a few-step student (its policy has no fewstep_timesteps)")
    return STUDENT_SAMPLERS[:calls]


def _paired(diff: np.ndarray) -> tuple[float, float | None]:
    """Mean of per-episode differences and its standard error."""
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else None


def _pair(teacher: Path, student: Path, episodes: int, work: Path, cache: Path, sample_seeds: int = 1,
          ddpm_sample_seeds: int | None = None) -> dict:
    name = student.name
    tb, sb = _bundle(teacher, cache / f"{teacher.name}_bundle"), _bundle(student, cache / f"{name}_bundle")
    mine = _student_samplers(student)
    seeds = {s: sample_seeds for s in TEACHER_SAMPLERS + mine}
    seeds["ddpm-100"] = ddpm_sample_seeds or sample_seeds
    evals = {s: _evaluations(tb, s, episodes, work, teacher.name, seeds[s]) for s in TEACHER_SAMPLERS}
    evals |= {s: _evaluations(sb, s, episodes, work, name, seeds[s]) for s in mine}
    # each start state's reward, averaged over the sample seeds
    rewards = {s: np.mean([[e["max_reward"] for e in r["episodes"]] for r in rs], axis=0) for s, rs in evals.items()}
    ref = rewards["ddpm-100"]
    rows = {}
    for s, rs in evals.items():
        scores = [r["score"] for r in rs]
        diff, se = _paired(rewards[s] - ref)
        rows[s] = {"score": float(np.mean(scores)), "success_rate": float(np.mean([r["success_rate"] for r in rs])),
                   "calls": rs[0]["steps"], "of_teacher_ddpm100": float(rewards[s].mean() / ref.mean()),
                   "diff_vs_ddpm100": diff, "paired_se": se,
                   # where a score is lost: whole episodes that go wrong (the block never near the goal)
                   "episodes_below_half": float(np.mean([sum(e["max_reward"] < 0.5 for e in r["episodes"])
                                                         for r in rs])),
                   "mean_chunk_latency_ms": rs[0].get("mean_chunk_latency_ms"), "wall_s": sum(r["wall_s"] for r in rs),
                   "scores_by_sample_seed": scores,
                   "sample_seed_sd": float(np.std(scores, ddof=1)) if len(scores) > 1 else None}
        if s in STUDENT_SAMPLERS:
            rows[s]["diff_vs_ddim10"], rows[s]["paired_se_vs_ddim10"] = _paired(rewards[s] - rewards["ddim-10"])
    t_sum = json.loads((teacher / "train_summary.json").read_text())
    s_sum = json.loads((student / "train_summary.json").read_text())
    t_cpu, s_cpu = _training_cpu(t_sum), _training_cpu(s_sum)
    return {"teacher": str(teacher), "student": str(student), "episodes": episodes, "samplers": rows,
            "teacher_cpu_s": t_cpu, "student_cpu_s": s_cpu,
            "cost_ratio": s_cpu / t_cpu, "teacher_steps": t_sum["steps"],
            "student_steps": s_sum["steps"], "teacher_wall_s": t_sum["wall_s"], "student_wall_s": s_sum["wall_s"]}


def _count(x: float) -> str:
    """A count averaged over sample seeds: whole as it is, else to one decimal."""
    return f"{x:g}" if float(x).is_integer() else f"{x:.1f}"


def _training_cpu(summary: dict) -> float:
    """A run's training CPU time: over every run of its folder (cpu_s_total) where the summary has it, else
    the last run's alone (cpu_s: a summary written before resumed runs added up, or resumed from such a
    checkpoint)."""
    total = summary.get("cpu_s_total")
    return float(total if total is not None else summary["cpu_s"])


def _markdown(result: dict) -> str:
    many = any(len(r.get("scores_by_sample_seed", [0])) > 1 for p in result["pairs"] for r in p["samplers"].values())
    lines = [f"# Few-step students vs their teachers (C++ runtime, seeds 100000..{100000 + result['episodes'] - 1})",
             "", f"{result['machine']}; {result['date']}; `uptime` before: {result['uptime_before']}", ""]
    if many:
        lines += ["Each sampler scored with several sample seeds (`dpkit-eval --sample-seed`) on the same start "
                  "states: score, success and episodes < 0.5 are means over them; the differences are of each "
                  "start state's mean reward, with paired standard errors.", "",
                  "| run | sampler | calls | sample seeds | score at each | mean score | sd | success | "
                  "of teacher DDPM-100 | diff (paired SE) | vs DDIM-10 (paired SE) | episodes < 0.5 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| run | sampler | calls | score | success | of teacher DDPM-100 | diff (paired SE) | episodes < 0.5 |",
                  "|---|---|---|---|---|---|---|---|"]
    shown: set[str] = set()  # a teacher's rows once, however many of its students follow
    for p in result["pairs"]:
        teacher, student = Path(p["teacher"]).name, Path(p["student"]).name
        for s, r in p["samplers"].items():
            run = student if s.startswith("fewstep") else teacher
            if run == teacher and p["teacher"] in shown:
                continue
            se = f"{r['diff_vs_ddpm100']:+.3f} ({r['paired_se']:.3f})" if s != "ddpm-100" else "—"
            below = r.get("episodes_below_half", "")
            below = _count(below) if isinstance(below, (int, float)) else below
            if not many:
                lines.append(f"| {run} | {s} | {r['calls']} | {r['score']:.3f} | "
                             f"{r['success_rate']:.2f} | {100 * r['of_teacher_ddpm100']:.1f} % | {se} | {below} |")
                continue
            each = r.get("scores_by_sample_seed", [r["score"]])
            sd = f"{r['sample_seed_sd']:.3f}" if r.get("sample_seed_sd") is not None else "—"
            vs = (f"{r['diff_vs_ddim10']:+.3f} ({r['paired_se_vs_ddim10']:.3f})" if "diff_vs_ddim10" in r else "—")
            lines.append(f"| {run} | {s} | {r['calls']} | {len(each)} | "
                         f"{' / '.join(f'{x:.3f}' for x in each)} | {r['score']:.3f} | {sd} | {r['success_rate']:.2f} | "
                         f"{100 * r['of_teacher_ddpm100']:.1f} % | {se} | {vs} | {below} |")
        shown.add(p["teacher"])
    lines += ["", "| teacher | student | teacher training CPU | distillation CPU | ratio |", "|---|---|---|---|---|"]
    for p in result["pairs"]:
        lines.append(f"| {Path(p['teacher']).name} | {Path(p['student']).name} | "
                     f"{p['teacher_cpu_s'] / 60:.1f} min ({p['teacher_steps']} steps) | "
                     f"{p['student_cpu_s'] / 60:.1f} min ({p['student_steps']} steps) | {100 * p['cost_ratio']:.0f} % |")
    lat = result.get("under_latency")
    if lat:
        delays = list(next(iter(lat["scores"].values())))
        lines += ["", f"Under latency ({Path(lat['teacher']).name}, {lat['episodes']} legacy seeds, dpkit-eval "
                      f"--latency-steps d, async-inpaint):", "",
                  "| sampler | " + " | ".join(f"d = {d}" for d in delays) + " |", "|---" * (len(delays) + 1) + "|"]
        for s, row in lat["scores"].items():
            lines.append(f"| {s} | " + " | ".join(f"{row[d]:.3f}" for d in delays) + " |")
    return "\n".join(lines) + "\n"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_fewstep", description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=2, action="append", metavar=("TEACHER", "STUDENT"), required=True)
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/fewstep")
    p.add_argument("--cache", default="benchmarks/.cache/fewstep", help="where the exported bundles go")
    p.add_argument("--latency-steps", default="", help="delays d for the under-latency table (e.g. 0,1,2,3,4; "
                                                      "first pair only; empty: none)")
    p.add_argument("--latency-episodes", type=int, default=50)
    p.add_argument("--sample-seeds", type=int, default=1, metavar="N",
                   help="score every sampler with sample seeds 0..N-1 and report means (default 1)")
    p.add_argument("--ddpm-sample-seeds", type=int, default=None, metavar="M",
                   help="the teacher's DDPM-100 with sample seeds 0..M-1 only (default N: it is the costliest)")
    args = p.parse_args(argv)
    if args.sample_seeds < 1 or (args.ddpm_sample_seeds is not None and args.ddpm_sample_seeds < 1):
        raise DpkitError("--sample-seeds and --ddpm-sample-seeds must be at least 1")
    out = Path(args.out)
    work = out / "evals"
    work.mkdir(parents=True, exist_ok=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(args.pair)) as pool:
        pairs = list(pool.map(lambda tp: _pair(Path(tp[0]), Path(tp[1]), args.episodes, work, Path(args.cache),
                                               args.sample_seeds, args.ddpm_sample_seeds), args.pair))
    delays = [int(d) for d in args.latency_steps.split(",") if d.strip()]
    latency = (_under_latency(Path(args.pair[0][0]), Path(args.pair[0][1]), delays, args.latency_episodes, work,
                              Path(args.cache)) if delays else None)
    result = {"machine": f"{platform.processor() or platform.machine()}; {platform.platform()}; {os.cpu_count()} CPUs",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "uptime_before": uptime,
              "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "wall_s": time.perf_counter() - t0, "episodes": args.episodes, "pairs": pairs,
              "under_latency": latency}
    atomic_write_json(out / "fewstep.json", result)
    atomic_write_text(out / "fewstep.md", _markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    main()
