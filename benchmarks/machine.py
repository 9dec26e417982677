"""The machine a benchmark runs on, measured in the same run: timing statistics, cores, fp32 GEMM
throughput and memory bandwidth (the roofline every latency row is read against), CPU model and flags.

    from dpkit.benchmarks.machine import machine_info, time_calls, latency_stats
    info = machine_info(threads=2, quick=True)
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import dpkit
from dpkit.errors import DpkitError
from dpkit.threads import usable_cpus

def usable_cores() -> int:
    """The CPUs this process may use (affinity mask, cgroup quota): dpkit.threads.usable_cpus."""
    return usable_cpus()


# --------------------------------------------------------------------------- statistics


def latency_stats(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/mean/min/max in milliseconds of chunk times in seconds (linear-interpolated percentiles).

    With fewer than ~100 samples p99 is close to the maximum: rows record `n` so readers can tell.
    """
    x = np.asarray(samples_s, dtype=np.float64) * 1e3
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise DpkitError("latency_stats needs at least one finite sample")
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(x.mean()),
            "min_ms": float(x.min()), "max_ms": float(x.max()), "n": int(x.size)}


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, budget_s: float = float("inf"),
               min_repeats: int = 1, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall time of each of up to `repeats` calls after `warmup` untimed ones; stops early past `budget_s`."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return times


# --------------------------------------------------------------------------- machine


def measure_gemm_gflops(threads: int, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-`repeats` fp32 n x n matrix product throughput (GFLOP/s, 2 n^3 FLOPs each)."""
    try:
        import torch
    except ImportError:  # runtime-only install: numpy's BLAS (its own thread count)
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        a @ a
        best = min(_timed(lambda: a @ a) for _ in range(repeats))
        return 2 * n**3 / best / 1e9
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        torch.mm(a, b)
        sync()

        def one():
            torch.mm(a, b)
            sync()

        best = min(_timed(one) for _ in range(repeats))
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / best / 1e9


def measure_mem_gbps(mbytes: int = 256, repeats: int = 5) -> float:
    """Best-of-`repeats` large array copy, counting bytes read + written (GB/s)."""
    src = np.ones(mbytes * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages first
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The SIMD extensions that decide fp32/bf16 GEMM speed, as the kernel reports them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]


def machine_info(threads: int, quick: bool) -> dict[str, Any]:
    """Versions, CPU, and the two roofline numbers: fp32 GEMM GFLOP/s and memory GB/s."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": usable_cores(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dpkit": dpkit.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # Other jobs on the machine slow every number: the 1-minute load average says how busy it was.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
        info["cuda"] = None
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = list(ort.get_available_providers())
    except ImportError:
        info["onnxruntime"] = None
        info["ort_providers"] = []
    info["gemm_n"] = 1024 if quick else 2048
    info["gemm_fp32_gflops"] = round(measure_gemm_gflops(threads, n=info["gemm_n"]), 1)
    info["mem_gbps"] = round(measure_mem_gbps(64 if quick else 256), 1)
    if info["cuda"]:
        info["gpu_gemm_fp32_gflops"] = round(measure_gemm_gflops(threads, n=4096, device="cuda"), 1)
    return info
