"""The main job end to end, as `make demo` runs it:

    python -m dpkit.demo --train-seconds 480 --out demo_out

train a low-dim Diffusion Policy on the real PushT demonstrations for a bounded time → export the ONNX
bundle (with parity checks) → evaluate it with the C++ runtime on the 50 legacy test seeds (plus the
PyTorch policy and a random policy on the same seeds) → a short latency benchmark → `OUT/report.md`.
Without --data, a machine that has no copy of the dataset first downloads it into data/pusht/
(dpkit.train.download; --no-download turns that off).

Each stage is the public CLI (`dpkit-train`, `dpkit-export`, `dpkit-eval`, `dpkit-bench`) writing JSON,
so the demo shows exactly what a user would run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_text


def _run(step: str, argv: list[str], timings: dict[str, float]) -> None:
    print(f"\n=== [demo] {step}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(argv)
    timings[step] = time.perf_counter() - t0
    if rc != 0:
        raise DpkitError(f"demo step '{step}' failed (exit {rc}); see its output above")
    print(f"=== [demo] {step} done in {timings[step]:.0f} s", flush=True)


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _report(out: Path, args: argparse.Namespace, timings: dict[str, float]) -> str:
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
        "",
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
    lines += ["", "## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpkit.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="output folder (an earlier demo output there is replaced "
                    "once this run succeeds, and restored if it fails)")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--data", default=None, help="PushT dataset (default: found automatically, else downloaded "
                    "into data/pusht/)")
    ap.add_argument("--no-download", action="store_true", help="fail instead of downloading a dataset not found")
    ap.add_argument("--train-seconds", type=float, default=480.0)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--backend", default="cpp", choices=["cpp", "ort"])
    args = ap.parse_args(argv)
    if args.train_seconds <= 0 or args.episodes <= 0:
        raise DpkitError("--train-seconds and --episodes must be positive")

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
    data = ["--data", args.data] if args.data else []
    if not args.data:  # found as dpkit-train would find it; on a fresh machine, the official pusht.zip is fetched
        from dpkit.train.data import resolve_dataset_path
        from dpkit.train.download import find_or_download

        t0 = time.perf_counter()
        data = ["--data", str(resolve_dataset_path(None) if args.no_download else find_or_download(None))]
        timings["dataset"] = time.perf_counter() - t0
    episodes = ["--episodes", str(args.episodes)]

    _run("train", [_bin("dpkit-train"), "--config", args.config, *data, "--out", str(out / "run"),
                   "--json", str(out / "train.json"), f"train.time_limit_s={args.train_seconds}"], timings)
    _run("export", [_bin("dpkit-export"), str(out / "run"), "--out", str(out / "bundle"),
                    "--json", str(out / "export.json")], timings)
    _run(f"eval-{args.backend}", [_bin("dpkit-eval"), "--bundle", str(out / "bundle"), "--backend", args.backend,
                                  *episodes, "--json", str(out / "eval_cpp.json"),
                                  "--video-dir", str(out / "videos")], timings)
    _run("eval-torch", [_bin("dpkit-eval"), "--checkpoint", str(out / "run"), "--backend", "torch", *episodes,
                        "--json", str(out / "eval_torch.json")], timings)
    _run("eval-random", [_bin("dpkit-eval"), "--random", *episodes, "--json", str(out / "eval_random.json")], timings)
    _run("bench", [_bin("dpkit-bench"), "--quick", "--json", str(out / "bench.json"),
                   "--out-dir", str(out / "bench")], timings)

    report = out / "report.md"
    atomic_write_text(report, _report(out, args, timings))
    print(f"\n[demo] report: {report.resolve()}")
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
