"""Per-chunk latency at batch 1: PyTorch (diffusers loop) vs Python ORT loop vs the C++ runtime.

    .venv/bin/python benchmarks/bench_runtime.py                       # bundles in benchmarks/.cache
    .venv/bin/python benchmarks/bench_runtime.py --bundles path/to/bundle --samplers ddim-10 --repeats 50

For each bundle (its checkpoint, named in policy.json `source`, serves the "torch" backend) and each
sampler, the same observations are sampled by the three backends; p50/p99 per chunk are recorded with the
speed-up of C++ over PyTorch eager. Separately the C++ loop's own cost per step is measured on a bundle
with a trivial denoiser (a handful of element-wise ops): (t[ddpm-100] - t[ddpm-10]) / 90 is the per-step
time of ORT's Run call on a trivial graph + the reverse step + the noise draw, an upper bound on the loop
overhead excluding the network. Results: benchmarks/results/runtime.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts = np.asarray(ts)
    return {"p50_ms": float(np.percentile(ts, 50)), "p99_ms": float(np.percentile(ts, 99)),
            "mean_ms": float(ts.mean()), "n": int(len(ts))}


def random_obs(policy, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = {}
    for name, shape in policy.info["observations"]:
        full = (1, policy.n_obs_steps, *shape)
        obs[name] = (rng.uniform(0, 1, full) if name == "image" else rng.uniform(50, 450, full)).astype(np.float32)
    return obs


def bench_bundle(bundle: Path, samplers: list[str], repeats: int, threads: int) -> list[dict]:
    from dpkit.runtime import load_policy

    manifest = json.loads((bundle / "policy.json").read_text())
    cpp = load_policy(bundle, backend="cpp", threads=threads, max_batch=1)
    backends = {"cpp": cpp, "ort": load_policy(bundle, backend="ort", threads=threads)}
    ckpt = Path(manifest.get("source", {}).get("checkpoint", ""))
    if ckpt and not ckpt.is_absolute():
        ckpt = ROOT / ckpt
    torch_note = None
    if ckpt.exists():
        backends["torch"] = load_policy(ckpt, backend="torch")
    else:
        torch_note = f"checkpoint {ckpt} not found: torch backend not timed"
    obs = random_obs(cpp)
    rows = []
    for name in samplers:
        kind, k = name.split("-")
        row = {"bundle": str(bundle), "config": manifest.get("config", {}).get("name"), "sampler": name,
               "batch": 1, "threads": threads, "ort_version": cpp.ort_version}
        for b, pol in backends.items():
            row[b] = timed(lambda: pol.predict_action(obs, sampler=kind, steps=int(k), seed=0), repeats)
        if "torch" in row:
            row["speedup_cpp_vs_torch"] = row["torch"]["p50_ms"] / row["cpp"]["p50_ms"]
        row["speedup_cpp_vs_ort"] = row["ort"]["p50_ms"] / row["cpp"]["p50_ms"]
        if torch_note:
            row["note"] = torch_note
        rows.append(row)
        print(f"{bundle.parent.name:32s} {name:9s} " + "  ".join(
            f"{b} p50 {row[b]['p50_ms']:8.3f} p99 {row[b]['p99_ms']:8.3f} ms" for b in backends)
            + (f"  C++ x{row['speedup_cpp_vs_torch']:.2f} vs torch" if "torch" in row else ""), flush=True)
    return rows


def loop_overhead(threads: int, repeats: int) -> dict:
    """Per-step cost of the C++ loop around a trivial denoiser (see the module docstring)."""
    from dpkit.runtime.cpp_policy import CppPolicy

    spec = importlib.util.spec_from_file_location("make_test_bundle", ROOT / "cpp/tests/make_test_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = mod.make_bundle(Path(tmp) / "trivial", "lowdim", trivial=True)
        out = {}
        for spinning in (True, False):
            pol = CppPolicy(bundle, threads=threads, max_batch=1, allow_spinning=spinning)
            obs = random_obs(pol)
            # Many repeats of the short chunk: its per-call Python overhead cancels in the difference.
            t100 = timed(lambda: pol.sample(obs, sampler="ddpm", steps=100), repeats * 4)
            t10 = timed(lambda: pol.sample(obs, sampler="ddpm", steps=10), repeats * 4)
            per_step_us = (t100["p50_ms"] - t10["p50_ms"]) / 90 * 1e3
            out["spinning" if spinning else "no_spinning"] = {
                "ddpm100_p50_ms": t100["p50_ms"], "ddpm10_p50_ms": t10["p50_ms"], "per_step_us": per_step_us}
            print(f"C++ loop, trivial denoiser, spinning={spinning}: {per_step_us:.2f} us/step "
                  f"(ddpm-100 {t100['p50_ms']:.3f} ms, ddpm-10 {t10['p50_ms']:.3f} ms)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", nargs="*", type=Path,
                    default=sorted((ROOT / "benchmarks/.cache").glob("*/bundle")))
    ap.add_argument("--samplers", nargs="*", default=["ddim-10", "ddpm-100"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/runtime.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from dpkit.io import atomic_write_json

    if not args.bundles:
        print("no bundles found (pass --bundles, or run benchmarks/bench_export.py first)", file=sys.stderr)
        return 1
    rows = []
    for b in args.bundles:
        rows += bench_bundle(b, args.samplers, args.repeats, args.threads)
    overhead = loop_overhead(args.threads, args.repeats)
    atomic_write_json(args.out, {
        "what": "per-chunk latency at batch 1 (predict_action from Python), p50/p99 in ms",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "rows": rows, "cpp_loop_overhead_per_step": overhead,
        "targets": {"tiny_speedup_vs_torch": 2.0, "pusht_lowdim_speedup_vs_torch": 1.3, "overhead_us_per_step": 20},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
