"""The main job end to end, as `make demo` runs it:

    python -m dpkit.demo --steps 3000 --out demo_out
    python -m dpkit.demo --steps 3000 --train-seconds 600     # also stop training after 10 min (a warning says so)

train a low-dim Diffusion Policy on the real PushT demonstrations for a number of optimizer steps → export the ONNX
bundle (with parity checks) → evaluate it with the C++ runtime on the 50 legacy test seeds (plus the
PyTorch policy and a random policy on the same seeds) → a short latency benchmark → `OUT/report.md`.
Without --data, a machine that has no copy of the dataset first downloads it into data/pusht/
(dpkit.train.download; --no-download turns that off).

Each stage is the public CLI (`dpkit-train`, `dpkit-export`, `dpkit-eval`, `dpkit-bench`) writing JSON,
so the demo shows exactly what a user would run. The training progress line shows the ETA of the step
target. Training counts steps, not seconds, so a busy machine makes the demo slower, not its policy worse;
with --train-seconds a time limit that ends training early is reported at the top of the report and in
the last lines printed: steps reached against the target, and that the scores are not representative.
The report records the machine's load average during each stage (sampled every 2 s) and each stage's
thread choice (dpkit.threads; `--threads N` is passed to every stage).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dpkit.cli_args import add_common_args
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_json, atomic_write_text
from dpkit.threads import load_average, usable_cpus

LOAD_SAMPLE_S = 2.0


class _LoadSampler:
    """The 1-minute load average, sampled every LOAD_SAMPLE_S seconds while a stage runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            load = load_average()
            if load is not None:
                self.samples.append(load[0])
            if self._stop.wait(LOAD_SAMPLE_S):
                return

    def __enter__(self) -> "_LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        x = self.samples
        return {"min": min(x), "mean": round(sum(x) / len(x), 2), "max": max(x), "samples": len(x)} if x else {}


def _run(step: str, argv: list[str], timings: dict[str, float], loads: dict[str, dict[str, Any]]) -> None:
    print(f"\n=== [demo] {step}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with _LoadSampler() as sampler:
        rc = subprocess.call(argv)
    timings[step] = time.perf_counter() - t0
    loads[step] = sampler.summary()
    if rc != 0:
        raise DpkitError(f"demo step '{step}' failed (exit {rc}); see its output above")
    load = loads[step]
    shown = f", load average {load['mean']:.2f} (max {load['max']:.2f})" if load else ""
    print(f"=== [demo] {step} done in {timings[step]:.0f} s{shown}", flush=True)


def training_warning(train: dict[str, Any]) -> list[str]:
    """The report's (and the demo's last lines') warning when a time limit ended training early."""
    if not train.get("stopped_by_time_limit"):
        return []
    steps, target = int(train["steps"]), int(train.get("target_steps") or train["steps"])
    return [f"**WARNING: training stopped by its time limit ({train.get('time_limit_s')} s) at step {steps} of "
            f"{target} ({100 * steps / max(target, 1):.0f} %). The policy is under-trained: the scores below are "
            f"not representative of dpkit.** Run without --train-seconds (or continue the run with "
            f"`dpkit-train --out RUN --resume`)."]


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _report(out: Path, args: argparse.Namespace, timings: dict[str, float],
            loads: dict[str, dict[str, Any]] | None = None) -> str:
    train = _load(out / "train.json")
    export = _load(out / "bundle" / "policy.json")
    ev_cpp = _load(out / "eval_cpp.json")
    ev_torch = _load(out / "eval_torch.json")
    ev_rand = _load(out / "eval_random.json")
    bench = _load(out / "bench.json")
    videos = sorted((out / "videos").glob("*.gif")) + sorted((out / "videos").glob("*.mp4"))

    lines = [
        "# dpkit demo report",
        "",
        f"Machine: {platform.node()} — {platform.processor() or platform.machine()}, "
        f"{bench.get('machine', {}).get('cores', '?')} cores; "
        f"fp32 GEMM {bench['machine']['gemm_fp32_gflops']:.0f} GFLOP/s, memory {bench['machine']['mem_gbps']:.1f} GB/s.",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}. Total time {sum(timings.values()) / 60:.1f} min.",
        f"Training: {train['steps']} of {train.get('target_steps', train['steps'])} optimizer steps"
        + (f", stopped by the time limit of {train.get('time_limit_s')} s" if train.get("stopped_by_time_limit")
           else "") + ".",
        "",
        *(line for w in training_warning(train) for line in (w, "")),
        "## Task score (gym-pusht, legacy test seeds, original protocol)",
        "",
        "| policy | backend | episodes | score (mean max reward) | success rate | mean chunk latency (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, ev in (("trained (bundle)", ev_cpp), ("trained (checkpoint)", ev_torch), ("random", ev_rand)):
        lat = ev.get("mean_chunk_latency_ms")
        lat_s = f"{lat:.2f}" if isinstance(lat, (int, float)) else "–"
        lines.append(
            f"| {name} | {ev.get('backend', '?')} | {len(ev['episodes'])} | {ev['score']:.3f} | "
            f"{ev['success_rate']:.2f} | {lat_s} |"
        )
    lines += [
        "",
        f"torch vs cpp score difference: {abs(ev_cpp['score'] - ev_torch['score']):.3f}.",
        "",
        "## Training",
        "",
        "```",
        json.dumps({k: train[k] for k in train if not isinstance(train[k], (dict, list))}, indent=2),
        "```",
        "",
        "## Export parity (max abs error, ORT vs PyTorch)",
        "",
        "| check | max abs error |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2e} |" for k, v in export.get("parity", {}).items() if isinstance(v, (int, float))]
    lines += ["", "## Latency (dpkit-bench --quick)", ""]
    md = out / "bench" / "latency_quick.md"
    lines.append(md.read_text() if md.exists() else json.dumps(bench.get("rows", []), indent=1))
    lines += ["", "## Rollouts", ""]
    lines += [f"![{v.stem}]({v.relative_to(out)})" for v in videos[:4]] or ["(no video written)"]
    lines += ["", "## Stages", "",
              f"Load average (1 min) sampled every {LOAD_SAMPLE_S:.0f} s during each stage, on {usable_cpus()} usable "
              "CPUs; a load above the CPU count means processes waited for a CPU. Threads: each stage's choice "
              "(dpkit.threads).", "",
              "| stage | seconds | load mean | load max | threads |", "|---|---:|---:|---:|---|"]
    threads = _stage_threads(out)
    for k, v in timings.items():
        load = (loads or {}).get(k) or {}
        mean, peak = (f"{load['mean']:.2f}", f"{load['max']:.2f}") if load else ("–", "–")
        lines.append(f"| {k} | {v:.0f} | {mean} | {peak} | {threads.get(k, '–')} |")
    return "\n".join(lines) + "\n"


def _stage_threads(out: Path) -> dict[str, str]:
    """Stage -> "N (spinning|no spinning)" from the "threads" key each stage's JSON records."""
    files = {"train": "train.json", "export": "export.json", "eval-cpp": "eval_cpp.json", "eval-ort": "eval_cpp.json",
             "eval-torch": "eval_torch.json", "eval-random": "eval_random.json", "bench": "bench.json"}
    shown = {}
    for stage, name in files.items():
        try:
            t = _load(out / name).get("threads") or {}
        except (OSError, ValueError):
            continue
        if "per_model" in t:
            shown[stage] = ", ".join(f"{m} {n}" for m, n in t["per_model"].items())
        elif t.get("threads"):
            shown[stage] = f"{t['threads']} ({'spinning' if t.get('spin') else 'no spinning'})"
    return shown


@cli_entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpkit.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="output folder (an earlier demo output there is replaced "
                    "once this run succeeds, and restored if it fails)")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--data", default=None, help="PushT dataset (default: found automatically, else downloaded "
                    "into data/pusht/)")
    ap.add_argument("--no-download", action="store_true", help="fail instead of downloading a dataset not found")
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps to train (default %(default)s)")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="also stop training after this many seconds (default: no limit); the report then says how "
                         "many steps were reached and that the scores are not representative")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--backend", default="cpp", choices=["cpp", "ort"])
    add_common_args(ap, progress=False)  # --threads N: passed to every stage
    args = ap.parse_args(argv)
    if (args.train_seconds is not None and args.train_seconds <= 0) or args.episodes <= 0 or args.steps <= 0:
        raise DpkitError("--steps, --train-seconds and --episodes must be positive")

    out = Path(args.out)
    prev = out.with_name(f"{out.name}.prev")
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").exists() and not (out / "run").exists()):
            raise DpkitError(f"{out} exists and is not an earlier demo output; choose another --out")
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(out, prev)  # kept until this run succeeds
    try:
        out.mkdir(parents=True)
        _stages(out, args)
    except BaseException:
        if prev.exists():
            shutil.rmtree(out, ignore_errors=True)
            os.replace(prev, out)
            print(f"[demo] failed; the previous results in {out} are restored", file=sys.stderr)
        raise
    shutil.rmtree(prev, ignore_errors=True)
    return 0


def _stages(out: Path, args: argparse.Namespace) -> None:
    timings: dict[str, float] = {}
    loads: dict[str, dict[str, Any]] = {}
    data = ["--data", args.data] if args.data else []
    if not args.data:  # found as dpkit-train would find it; on a fresh machine, the official pusht.zip is fetched
        from dpkit.train.data import resolve_dataset_path
        from dpkit.train.download import find_or_download

        t0 = time.perf_counter()
        data = ["--data", str(resolve_dataset_path(None) if args.no_download else find_or_download(None))]
        timings["dataset"] = time.perf_counter() - t0
    episodes = ["--episodes", str(args.episodes)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    limit = [f"train.time_limit_s={args.train_seconds}"] if args.train_seconds else []

    _run("train", [_bin("dpkit-train"), "--config", args.config, *data, "--out", str(out / "run"),
                   "--steps", str(args.steps), "--json", str(out / "train.json"), *threads, *limit], timings, loads)
    _run("export", [_bin("dpkit-export"), str(out / "run"), "--out", str(out / "bundle"),
                    "--json", str(out / "export.json"), *threads], timings, loads)
    _run(f"eval-{args.backend}", [_bin("dpkit-eval"), "--bundle", str(out / "bundle"), "--backend", args.backend,
                                  *episodes, "--json", str(out / "eval_cpp.json"),
                                  "--video-dir", str(out / "videos"), *threads], timings, loads)
    _run("eval-torch", [_bin("dpkit-eval"), "--checkpoint", str(out / "run"), "--backend", "torch", *episodes,
                        "--json", str(out / "eval_torch.json"), *threads], timings, loads)
    _run("eval-random", [_bin("dpkit-eval"), "--random", *episodes, "--json", str(out / "eval_random.json")],
         timings, loads)
    _run("bench", [_bin("dpkit-bench"), "--quick", "--json", str(out / "bench.json"),
                   "--out-dir", str(out / "bench"), *threads], timings, loads)

    report = out / "report.md"
    atomic_write_text(report, _report(out, args, timings, loads))
    atomic_write_json(out / "stages.json", {"seconds": timings, "load_avg_1m": loads, "usable_cpus": usable_cpus()})
    print(f"\n[demo] report: {report.resolve()}")
    print((out / "report.md").read_text())
    for line in training_warning(_load(out / "train.json")):  # the last lines, where a reader looks
        print(line.replace("**", ""))


if __name__ == "__main__":
    main()
