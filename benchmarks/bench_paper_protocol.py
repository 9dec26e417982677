"""The paper's PushT low-dim table on this machine: several training seeds of one config, scored with the
paper's protocol (max and mean of the last 10 evaluated checkpoints, 50 legacy seeds), beside the paper.

    python -m dpkit.benchmarks.bench_paper_protocol                       # 3 seeds of pusht_lowdim_cpu, 2 at once
    python -m dpkit.benchmarks.bench_paper_protocol --seeds 42 43 44 --parallel 3 --runs-dir runs/paper_cpu
    python -m dpkit.benchmarks.bench_paper_protocol --report-only         # tables and plot from finished runs
    python -m dpkit.benchmarks.bench_paper_protocol data.max_train_episodes=90 --runs-dir runs/paper_cpu_90ep \
        --name paper_protocol_cpu_90ep --baseline benchmarks/results/paper_protocol_cpu.json  # the paper's data

`key=value` overrides go to every run's dpkit-train (and into the table's label). `--baseline` adds an earlier
result's rows to the table and its curves to the plot, so two data budgets or schedules sit side by side.

Each seed trains with `dpkit-train --config CONFIG --seed S` in its own process with one OpenMP thread
(`--threads`); the config's `train.eval_*` fields run the evaluations, so every number comes from the
runs' own `train_summary.json` (the trainer's protocol summary, the same code as `dpkit-eval`). A run
folder that already finished is not trained again; one that stopped is resumed. Each run's wall and CPU
time (its process tree, from the OS) go to `<run>/timing.json`. Writes `<out-dir>/<name>.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.benchmarks.report import png_bytes, pyplot, write_report
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_json, check_writable_file

# Diffusion Policy (Chi et al. 2023), PushT with low-dim (keypoint) observations, CNN-based policy, DDPM-100:
# max / mean over the last 10 checkpoints, averaged over 3 training seeds x 50 environment starts.
PAPER = {"name": "Diffusion Policy-C, low-dim (paper)", "max": 0.95, "mean": 0.91, "sampler": "ddpm-100"}
TIMING = "timing.json"


def _summary(run: Path) -> dict[str, Any] | None:
    path = run / "train_summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise DpkitError(f"{path} is not valid JSON") from None


def _finished(run: Path, steps: int) -> bool:
    s = _summary(run)
    return s is not None and s.get("steps", 0) >= steps and not s.get("stopped_by_time_limit", False)


def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    for line in reversed(path.read_text().splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def train_seeds(config: str, overrides: list[str], seeds: list[int], runs_dir: Path, parallel: int, threads: int,
                data: str | None, progress: bool) -> None:
    """Train every seed whose run folder is not finished, `parallel` at a time; time each from the OS."""
    from tqdm import tqdm

    from dpkit.train.config import load_config

    steps = load_config(config, overrides).train.steps
    todo = [s for s in seeds if not _finished(runs_dir / f"seed{s}", steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running: dict[int, tuple[subprocess.Popen, int, float]] = {}  # pid -> (process, seed, start)
    bar = tqdm(total=steps * len(todo), unit="step", desc=f"{config} x{len(todo)} seeds", disable=not progress,
               dynamic_ncols=True)
    failed = []
    try:
        while todo or running:
            while todo and len(running) < parallel:
                seed = todo.pop(0)
                run = runs_dir / f"seed{seed}"
                resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*"))
                cmd = [sys.executable, "-m", "dpkit.train.cli", "--out", str(run), "--no-progress"]
                cmd += ["--resume", "--steps", str(steps)] if resume else ["--config", config, "--seed", str(seed), "--force", *overrides]
                if data:
                    cmd += ["--data", data]
                run.mkdir(parents=True, exist_ok=True)
                log = (run / "train.log").open("a")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                log.close()
                running[proc.pid] = (proc, seed, time.perf_counter())
            pid, status, usage = os.wait4(-1, os.WNOHANG)  # rusage covers the ended run's whole process tree
            if pid == 0:
                bar.n = sum(_last_step(runs_dir / f"seed{s}") for s in seeds if s not in todo)
                bar.refresh()
                time.sleep(2)
                continue
            if pid not in running:
                continue
            proc, seed, start = running.pop(pid)
            proc.returncode = os.waitstatus_to_exitcode(status)
            run = runs_dir / f"seed{seed}"
            atomic_write_json(run / TIMING, {"wall_s": round(time.perf_counter() - start, 1),
                                             "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                                             "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
                                             "runs_at_once": parallel, "omp_threads": threads,
                                             "exit_code": proc.returncode})
            if proc.returncode != 0:
                failed.append(f"seed {seed} (exit {proc.returncode}, see {run / 'train.log'})")
    finally:
        bar.close()
        for proc, _, _ in running.values():
            proc.terminate()
    if failed:
        raise DpkitError("training failed for " + ", ".join(failed))


def collect(runs_dir: Path, seeds: list[int]) -> dict[str, Any]:
    """Per seed and across seeds: the protocol summary of each run, its curve and its times."""
    per_seed = []
    for seed in seeds:
        run = runs_dir / f"seed{seed}"
        s = _summary(run)
        if s is None or not s.get("protocol"):
            raise DpkitError(f"{run}: no finished run with rollout evaluations (train_summary.json 'protocol')")
        timing = json.loads((run / TIMING).read_text()) if (run / TIMING).is_file() else {}
        state = Path(s["checkpoint"]) / "state.json"
        data = json.loads(state.read_text())["config"]["data"] if state.is_file() else {}
        per_seed.append({
            "seed": seed, "run_dir": str(run), "config": s["config"], "steps": s["steps"],
            "max_train_episodes": data.get("max_train_episodes"),
            "wall_s": timing.get("wall_s", s.get("wall_s")), "cpu_s": timing.get("cpu_s", s.get("cpu_s")),
            "eval_s": s.get("eval_s"), "runs_at_once": timing.get("runs_at_once"),
            "protocol": s["protocol"], "evaluations": s["evaluations"],
        })
    samplers = list(per_seed[0]["protocol"]["samplers"])
    aggregate = {}
    for label in samplers:
        rows = [p["protocol"]["samplers"][label] for p in per_seed]
        agg = {}
        for key in ("max", "mean", "success_rate_max", "success_rate_mean"):
            values = [r[key] for r in rows if r.get(key) is not None]
            agg[key] = float(np.mean(values)) if values else None
            agg[f"{key}_range"] = [float(min(values)), float(max(values))] if values else None
        steps = sorted({e["step"] for p in per_seed for e in p["evaluations"] if label in e["samplers"]})
        curve = []
        for step in steps:
            scores = [e["samplers"][label]["score"] for p in per_seed for e in p["evaluations"]
                      if e["step"] == step and label in e["samplers"]]
            curve.append({"step": step, "mean": float(np.mean(scores)), "min": float(min(scores)),
                          "max": float(max(scores)), "std": float(np.std(scores)), "n": len(scores)})
        agg["curve"] = curve
        aggregate[label] = agg
    return {"seeds": per_seed, "samplers": aggregate}


def policy_label(result: dict[str, Any]) -> str:
    """`config` and its overrides, e.g. `pusht_lowdim_cpu data.max_train_episodes=90`."""
    return " ".join([result["config"], *result.get("overrides", [])])


def markdown(result: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    m = result["machine"]
    p0 = result["seeds"][0]["protocol"]
    lines = [
        f"# The paper's PushT low-dim protocol on {m['cores']} CPU cores ({policy_label(result)})", "",
        f"{m['cpu']}; {m['platform']}; torch {m['torch']}; {result['date']}. "
        f"{len(result['seeds'])} training seeds; each run's last {p0['last']} evaluations "
        f"({p0['episodes']} legacy seeds each). Per seed: max and mean of those evaluations; the table "
        "gives their average over seeds (range over seeds in brackets), as the paper does."
        + (f" The baseline rows are {baseline['date']}'s result." if baseline else ""), "",
        "| policy | sampler | max of last 10 | mean of last 10 | success rate (mean of last 10) |",
        "|---|---|---|---|---|",
        f"| {PAPER['name']} | {PAPER['sampler']} | {PAPER['max']:.2f} | {PAPER['mean']:.2f} | – |",
    ]

    def cell(a: dict[str, Any], key: str) -> str:
        if a[key] is None:
            return "–"
        lo, hi = a[f"{key}_range"]
        return f"{a[key]:.3f} [{lo:.3f}–{hi:.3f}]"

    for r in ([baseline] if baseline else []) + [result]:
        for label, a in r["samplers"].items():
            lines.append(f"| dpkit `{policy_label(r)}` ({_episodes(r)}) | {label} | {cell(a, 'max')} | "
                         f"{cell(a, 'mean')} | {cell(a, 'success_rate_mean')} |")
    lines += ["", "| seed | steps | wall | CPU time | wall in rollout evaluations | runs sharing the cores | "
              + " | ".join(f"{label} max / mean" for label in result["samplers"]) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(result["samplers"])]
    for s in result["seeds"]:
        scores = " | ".join(f"{r['max']:.3f} / {r['mean']:.3f}" for r in s["protocol"]["samplers"].values())
        lines.append(f"| {s['seed']} | {s['steps']} | {_minutes(s['wall_s'])} | {_minutes(s['cpu_s'])} | "
                     f"{_minutes(s['eval_s'])} | {s['runs_at_once'] or '–'} | {scores} |")
    return "\n".join(lines) + "\n"


def _episodes(result: dict[str, Any]) -> str:
    """How many training episodes the runs used, from their resolved configs (null: every training episode)."""
    n = {s.get("max_train_episodes") for s in result["seeds"]}
    return "all training episodes" if n == {None} else " / ".join(f"{k} episodes" for k in sorted(n, key=str))


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def plot(result: dict[str, Any], baseline: dict[str, Any] | None = None) -> bytes:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r, style in (((baseline, ":"),) if baseline else ()) + ((result, "-"),):
        for label, a in r["samplers"].items():
            steps = [c["step"] for c in a["curve"]]
            mean = np.array([c["mean"] for c in a["curve"]])
            line, = ax.plot(steps, mean, ls=style, marker="o", ms=3,
                            label=f"{label}, {_episodes(r)} (mean of {a['curve'][0]['n']} seeds)")
            ax.fill_between(steps, [c["min"] for c in a["curve"]], [c["max"] for c in a["curve"]],
                            color=line.get_color(), alpha=0.15)
    for key, style in (("max", "--"), ("mean", "-.")):
        ax.axhline(PAPER[key], color="gray", ls=style, lw=1, label=f"paper {key} of last 10 ({PAPER[key]:.2f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("score (50 legacy seeds)")
    ax.set_title(f"{policy_label(result)}: score vs step (band: min–max over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_paper_protocol", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="pusht_lowdim_cpu", help="named config or YAML with train.eval_* set")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--runs-dir", type=Path, default=Path("runs/paper_cpu"))
    p.add_argument("--parallel", type=int, default=2, help="runs at once (default %(default)s: one per core)")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per run (default %(default)s)")
    p.add_argument("--data", help="dataset (default: the config's)")
    p.add_argument("--report-only", action="store_true", help="do not train; report the runs in --runs-dir")
    p.add_argument("--name", default="paper_protocol_cpu", help="file stem of the results")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--baseline", type=Path, help="an earlier result JSON of this script to show beside this one")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run, e.g. "
                   "data.max_train_episodes=90")
    a = p.parse_args(argv)
    if a.parallel < 1 or a.threads < 1 or len(set(a.seeds)) != len(a.seeds) or min(a.seeds) < 0:
        raise DpkitError("--parallel and --threads must be >= 1 and --seeds distinct non-negative integers")
    from dpkit.train.config import load_config

    cfg = load_config(a.config, a.overrides)  # a bad name or override fails before anything runs
    baseline = None
    if a.baseline is not None:
        try:
            baseline = json.loads(a.baseline.read_text())
            baseline["samplers"], baseline["config"], baseline["date"]  # noqa: B018 -- the keys the report reads
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DpkitError(f"--baseline {a.baseline}: not a result of this script ({e})") from None
    if cfg.train.eval_every <= 0:
        raise DpkitError(f"config {a.config!r} has train.eval_every=0: it runs no rollout evaluations to report")
    stem = a.out_dir / a.name
    check_writable_file(stem.with_suffix(".json"))
    if not a.report_only:
        train_seeds(a.config, a.overrides, a.seeds, a.runs_dir, a.parallel, a.threads, a.data, not a.no_progress)
    import torch

    from dpkit.benchmarks.machine import cpu_model, usable_cores

    result = {
        "config": cfg.name,
        "overrides": list(a.overrides),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": usable_cores(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "paper": PAPER,
        **collect(a.runs_dir, a.seeds),
    }
    write_report(stem, result, markdown(result, baseline), plot(result, baseline))
    return 0


if __name__ == "__main__":
    main()
