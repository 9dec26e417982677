"""Per-chunk latency of every backend, on this machine, in one run (`dpkit-bench`).

    dpkit-bench --quick                                   # ~1 min on 2 cores: tiny + pusht_lowdim, B 1/4, DDIM-10
    dpkit-bench                                           # all models, batch 1 and 50, DDPM-100 / DDIM-10
    dpkit-bench --models tiny --backends ort cpp --batch 1 8 --samplers ddim-10 --json out.json

For each model (random weights: latency does not depend on training) it builds a checkpoint and a bundle
once (cached in `--cache-dir`), then times `policy.sample(obs, sampler, steps)` — one action chunk — for
every backend and batch, plus the encoder alone and one denoiser call, from which the per-step overhead
of each Python sampling loop follows: (chunk - encoder) / K - denoiser call; the C++ runtime times its own
networks inside each call, so its overhead is exact. The same run measures the machine's
fp32 GEMM throughput and memory bandwidth and counts the model's FLOPs (torch's FlopCounterMode), so
every row also says what share of the GEMM peak it achieves — a number that carries to other machines.

Results go to `--out-dir` (default benchmarks/results/) as latency.json, latency.md and latency.png
(`latency_quick.*` for --quick, so a quick run never replaces a full one), each written atomically.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import dpkit
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable_file

MODELS = ("tiny", "pusht_lowdim", "pusht_image")
# name -> (load_policy backend, provider). Providers other than CPU are tried only when present.
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "cpu"),
    "ort": ("ort", "cpu"),
    "cpp": ("cpp", "cpu"),
    "torch-cuda": ("torch", "cuda"),
    "ort-cuda": ("ort", "cuda"),
    "ort-tensorrt": ("ort", "tensorrt"),
    "cpp-cuda": ("cpp", "cuda"),
    "cpp-tensorrt": ("cpp", "tensorrt"),
}
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
DEFAULT_SAMPLERS = ("ddpm-100", "ddim-10")
SEED = 0


@dataclass
class Settings:
    models: tuple[str, ...] = MODELS
    backends: tuple[str, ...] = tuple(BACKENDS)
    batches: tuple[int, ...] = (1, 50)
    samplers: tuple[tuple[str, int], ...] = (("ddpm", 100), ("ddim", 10))
    repeats: int = 20
    """Timed chunks per row (fewer when `row_seconds` runs out first; never fewer than `min_repeats`)."""
    warmup: int = 1
    row_seconds: float = 30.0
    """Soft time budget per row: a 65 M U-Net at batch 50 with 100 steps takes seconds per chunk on 2 cores."""
    min_repeats: int = 3
    threads: int = 0
    """Intra-op threads for every backend (0: the cores this process may use)."""
    quick: bool = False

    def __post_init__(self) -> None:
        if self.threads <= 0:
            self.threads = usable_cores()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


# --------------------------------------------------------------------------- models


@dataclass
class ModelArtifacts:
    name: str
    checkpoint: Path
    bundle: Path | None
    bundle_error: str | None
    params: int
    encoder_flops: int  # per sample
    denoiser_flops: int  # per sample, one call
    obs_spec: list[dict[str, Any]]
    n_obs_steps: int
    horizon: int
    action_dim: int

    def chunk_flops(self, batch: int, steps: int) -> int:
        return batch * (self.encoder_flops + steps * self.denoiser_flops)


def synthetic_normalizer(policy_cfg):
    """Min-max statistics spanning the PushT table: actions, agent position and keypoints in [0, 512] px."""
    from dpkit.train.config import LOWDIM_OBS_DIM
    from dpkit.train.normalizer import Normalizer

    def span(dim: int) -> np.ndarray:
        return np.array([[0.0] * dim, [512.0] * dim])

    data = {"action": span(policy_cfg.action_dim)}
    if policy_cfg.obs_mode == "image":
        data["agent_pos"] = span(2)
    else:
        data["obs"] = span(LOWDIM_OBS_DIM)
    return Normalizer.fit(data)


def count_flops(policy) -> tuple[int, int]:
    """(encoder FLOPs, one denoiser call's FLOPs) per sample, counted at batch 1 (both are linear in batch)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = policy.cfg
    obs = policy.example_obs(1)
    with torch.no_grad():
        with FlopCounterMode(display=False) as enc:
            cond = policy.encoder(*[obs[k] for k in policy.obs_keys])
        x = torch.zeros(1, cfg.horizon, cfg.action_dim)
        t = torch.zeros(1, dtype=torch.int64)
        with FlopCounterMode(display=False) as den:
            policy.denoiser(x, t, cond)
    return int(enc.get_total_flops()), int(den.get_total_flops())


def _export_bundle(checkpoint: Path, out: Path, log: Callable[[str], None]) -> None:
    """Export (and parity-verify) through the export stage, the only writer of bundles."""
    try:
        from dpkit.export.cli import export_bundle
    except ImportError as e:
        raise DpkitError(f"the export stage is not importable ({e})") from None
    lines: list[str] = []
    try:
        export_bundle(checkpoint, out, force=True, log=lines.append)
    except DpkitError:
        for line in lines:  # its parity table explains a failure
            log(line)
        raise


def _exporter_digest() -> str:
    """Hash of the export stage's source: a changed exporter makes new cached bundles, never stale ones."""
    import dpkit.export

    h = hashlib.sha256()
    for f in sorted(Path(dpkit.export.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def prepare_model(name: str, cache_dir: Path, log: Callable[[str], None] = print,
                  need_bundle: bool = True) -> ModelArtifacts:
    """Checkpoint + bundle of config `name` with random weights, built once per config in `cache_dir`.

    A bundle that fails to export is recorded (the torch backend still runs); the "ort"/"cpp" rows of
    that model are then skipped with the reason. `need_bundle=False` (torch rows only) skips the export.
    """
    import torch

    from dpkit.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
    from dpkit.train.config import load_config
    from dpkit.train.policy import DiffusionPolicy

    cfg = load_config(name)
    key = hashlib.sha256(json.dumps([cfg.to_dict(), dpkit.__version__, SEED, _exporter_digest()],
                                    sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir / f"{name}-{key}"
    run_dir, bundle_dir = root / "run", root / "bundle"
    try:
        ckpt = resolve_checkpoint(run_dir)
        policy, _ = load_checkpoint(ckpt)
    except DpkitError:
        log(f"[{name}] building a random-weight checkpoint in {run_dir}")
        torch.manual_seed(SEED)
        policy = DiffusionPolicy(cfg.policy, synthetic_normalizer(cfg.policy)).eval()
        state = {"config": cfg.to_dict(), "normalizer": policy.normalizer.to_dict(), "epoch": 0,
                 "note": "random weights for dpkit-bench"}
        ckpt = save_checkpoint(run_dir, 0, model=policy, ema_model=policy, state=state, keep=1)
    bundle_error = None if need_bundle else "not needed (no bundle backend requested)"
    if need_bundle and not (bundle_dir / "policy.json").is_file():
        log(f"[{name}] exporting the bundle to {bundle_dir}")
        try:
            _export_bundle(ckpt, bundle_dir, log)
        except DpkitError as e:
            bundle_error = f"export failed: {e}"
        except Exception as e:  # an export bug must not take the torch rows down with it
            bundle_error = f"export failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    enc_flops, den_flops = count_flops(policy)
    return ModelArtifacts(
        name=name, checkpoint=Path(ckpt), bundle=None if bundle_error else bundle_dir, bundle_error=bundle_error,
        params=policy.num_parameters(), encoder_flops=enc_flops, denoiser_flops=den_flops,
        obs_spec=policy.observation_spec(), n_obs_steps=cfg.policy.n_obs_steps, horizon=cfg.policy.horizon,
        action_dim=cfg.policy.action_dim,
    )


def random_obs(model: ModelArtifacts, batch: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Observations in the environment's ranges (images in [0, 1], positions in pixels)."""
    rng = np.random.default_rng(seed)
    obs = {}
    for o in model.obs_spec:
        hi = 1.0 if o["name"] == "image" else 512.0
        obs[o["name"]] = (rng.random((batch, model.n_obs_steps, *o["shape"])) * hi).astype(np.float32)
    return obs


# --------------------------------------------------------------------------- backends


class BackendUnavailable(Exception):
    """A backend that cannot run here (no GPU, module not built): its rows are skipped with this reason."""


def backend_available(backend: str) -> str | None:
    """None when `backend` can be tried on this machine, else why not (checked before loading anything)."""
    kind, provider = BACKENDS[backend]
    if kind == "torch":
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        if provider == "cuda" and not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if ORT_PROVIDERS[provider] not in ort.get_available_providers():
        return f"onnxruntime has no {ORT_PROVIDERS[provider]} (available: {', '.join(ort.get_available_providers())})"
    if kind == "cpp":
        try:
            import dpkit.runtime.cpp_policy  # noqa: F401
        except ImportError as e:
            return f"the C++ runtime module is not built ({e})"
    return None


@dataclass
class Loaded:
    """A loaded backend: sample(obs, sampler, steps), plus encoder/denoiser callables for the parts."""

    policy: Any
    provider: str
    sync: Callable[[], None] = field(default=lambda: None)
    encode: Callable[[dict[str, np.ndarray]], Any] | None = None
    make_denoise: Callable[[int], Callable[[], Any]] | None = None
    """batch -> a no-argument call of the denoiser at that batch (inputs prepared once)."""
    loop_ms: Callable[[], float] | None = None
    """The backend's own measure of its last chunk's time outside the networks (the C++ runtime's timer)."""


def load_backend(backend: str, model: ModelArtifacts, threads: int, max_batch: int) -> Loaded:
    from dpkit.runtime import load_policy

    kind, provider = BACKENDS[backend]
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
        device = "cuda" if provider == "cuda" else "cpu"
        pol = load_policy(model.checkpoint, backend="torch", device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        net = pol.policy

        def encode(obs):
            with torch.no_grad():
                return net.encoder(*[torch.from_numpy(obs[k]).to(device) for k in pol.obs_keys])

        def make_denoise(batch):
            cond = encode(random_obs(model, batch))
            x = torch.randn(batch, model.horizon, model.action_dim, device=device)
            t = torch.full((batch,), 50, dtype=torch.int64, device=device)

            def call():
                with torch.no_grad():
                    net.denoiser(x, t, cond)
            return call

        return Loaded(pol, provider, sync, encode, make_denoise)

    if model.bundle is None:
        raise BackendUnavailable(f"no bundle for {model.name}: {model.bundle_error}")
    if kind == "ort":
        providers: list[Any] = [ORT_PROVIDERS[provider]]
        if provider == "tensorrt":  # OrtPolicy gives the bare name the bundle's engine-cache options
            providers = [ORT_PROVIDERS["tensorrt"], ORT_PROVIDERS["cuda"]]
        pol = load_policy(model.bundle, backend="ort", providers=providers, threads=threads)
        if pol.providers[0] != ORT_PROVIDERS[provider]:  # ORT falls back to CPU silently
            raise BackendUnavailable(f"ONNX Runtime fell back to {pol.providers[0]}")

        def make_denoise(batch):
            # Network time only: inputs and output bound once (IOBinding), so the per-call numpy conversion
            # the Python loop pays counts as loop overhead, and the C++ loop is compared with the same number.
            cond = pol.encode(random_obs(model, batch))
            x = np.random.default_rng(SEED).standard_normal((batch, model.horizon, model.action_dim), dtype=np.float32)
            t = np.full((batch,), 50, dtype=np.int64)
            binding = pol.denoiser.io_binding()
            for name, value in (("sample", x), ("timestep", t), ("cond", cond)):
                binding.bind_cpu_input(name, value)
            binding.bind_output("noise_pred")
            return lambda: pol.denoiser.run_with_iobinding(binding)

        return Loaded(pol, provider, encode=pol.encode, make_denoise=make_denoise)

    # Buffers are preallocated for max_batch; an unavailable provider is an error there, not a fallback.
    pol = load_policy(model.bundle, backend="cpp", provider=provider, threads=threads, max_batch=max_batch)
    return Loaded(pol, provider, loop_ms=lambda: pol.last_timing["loop_ms"])


# --------------------------------------------------------------------------- the run


def part_rows(backend: str, loaded: Loaded, model: ModelArtifacts, batch: int, s: Settings,
              peak: float) -> list[dict[str, Any]]:
    """The encoder alone and one denoiser call, timed on the backend's own sessions/modules."""
    rows = []
    if loaded.encode is None or loaded.make_denoise is None:
        return rows
    obs = random_obs(model, batch)
    parts = [("encoder", 0, lambda: loaded.encode(obs), model.encoder_flops),
             ("denoiser", 1, loaded.make_denoise(batch), model.denoiser_flops)]
    for kind, steps, fn, flops in parts:
        # One call is short: many repeats cost little and steady the median the overhead is computed from.
        times = time_calls(fn, repeats=max(s.repeats, 30), warmup=max(s.warmup, 3), budget_s=min(s.row_seconds, 5.0),
                           min_repeats=s.min_repeats, sync=loaded.sync)
        rows.append(make_row(backend, loaded.provider, model, kind, batch, kind, steps, times, batch * flops, peak))
    return rows


def make_row(backend: str, provider: str, model: ModelArtifacts, kind: str, batch: int, sampler: str, steps: int,
             times: list[float], flops: int, peak: float) -> dict[str, Any]:
    st = latency_stats(times)
    # The low-dim encoder is only a normalization: no matmul/conv FLOPs, so no meaningful rate.
    gflops = flops / (st["p50_ms"] / 1e3) / 1e9 if flops else None
    return {"backend": backend, "provider": provider, "model": model.name, "kind": kind, "batch": batch,
            "sampler": sampler, "steps": steps, **{k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()},
            "gflop_per_chunk": round(flops / 1e9, 4), "gflops": None if gflops is None else round(gflops, 2),
            "peak_share": round(gflops / peak, 4) if peak and gflops is not None else None}


def add_overheads(rows: list[dict[str, Any]]) -> None:
    """Per-step loop overhead of each chunk row without one: (chunk - encoder) / K - denoiser call (µs).

    From p50s of separately timed parts on the backend's own modules/sessions, so on a noisy machine the
    difference can come out below zero. Rows that measured it inside the call keep theirs: the C++ runtime
    times its networks itself (`overhead_parts_from` = "internal"), which is exact per call.
    """
    parts = {(r["backend"], r["model"], r["batch"], r["kind"]): r["p50_ms"] for r in rows if r["kind"] != "chunk"}
    for r in rows:
        if r["kind"] != "chunk" or r.get("overhead_us_per_step") is not None:
            continue
        src = r["backend"]
        enc = parts.get((src, r["model"], r["batch"], "encoder"))
        den = parts.get((src, r["model"], r["batch"], "denoiser"))
        if enc is None or den is None:
            r["overhead_us_per_step"] = None
            continue
        r["overhead_us_per_step"] = round(((r["p50_ms"] - enc) / r["steps"] - den) * 1e3, 1)
        r["overhead_parts_from"] = src


def run_benchmark(s: Settings, cache_dir: Path, log: Callable[[str], None] = print,
                  progress: bool = True) -> dict[str, Any]:
    """Measure the machine, prepare the models, time every (model, backend, batch, sampler) row."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    try:  # every torch step (checkpoint, export, FLOP count, the torch rows) uses the benchmark's threads
        import torch

        torch.set_num_threads(s.threads)
    except ImportError:
        pass
    log(f"measuring the machine (fp32 GEMM, memory copy) with {s.threads} threads")
    machine = machine_info(s.threads, s.quick)
    log(f"  {machine['cpu']}: {machine['gemm_fp32_gflops']} GFLOP/s fp32 GEMM, {machine['mem_gbps']} GB/s copy")
    skipped: list[dict[str, Any]] = []
    backends = []
    for b in s.backends:
        reason = backend_available(b)
        if reason:
            skipped.append({"backend": b, "model": None, "reason": reason})
            log(f"skipping backend {b}: {reason}")
        else:
            backends.append(b)
    need_bundle = any(BACKENDS[b][0] != "torch" for b in backends)
    models = [prepare_model(m, cache_dir, log, need_bundle) for m in s.models]
    for m in models:
        if m.bundle_error and need_bundle:
            log(f"[{m.name}] {m.bundle_error}")

    plan = [(m, b) for m in models for b in backends]
    n_rows = len(plan) * len(s.batches) * len(s.samplers)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=n_rows, desc="dpkit-bench", unit="row", disable=not progress, dynamic_ncols=True)
    write = bar.write if progress else log
    for m, b in plan:
        peak = machine.get("gpu_gemm_fp32_gflops") if BACKENDS[b][1] != "cpu" else machine["gemm_fp32_gflops"]
        try:
            loaded = load_backend(b, m, s.threads, max(s.batches))
        except (BackendUnavailable, DpkitError) as e:
            skipped.append({"backend": b, "model": m.name, "reason": str(e)})
            write(f"skipping {b} on {m.name}: {e}")
            bar.update(len(s.batches) * len(s.samplers))
            continue
        for batch in s.batches:
            obs = random_obs(m, batch)
            for sampler, k in s.samplers:
                bar.set_postfix_str(f"{m.name} {b} B={batch} {sampler}-{k}")
                loops: list[float] = []

                def chunk() -> None:
                    loaded.policy.sample(obs, sampler=sampler, steps=k, seed=SEED)
                    if loaded.loop_ms is not None:
                        loops.append(loaded.loop_ms())
                try:
                    times = time_calls(chunk, s.repeats, s.warmup, s.row_seconds, s.min_repeats, loaded.sync)
                except DpkitError as e:  # e.g. a (sampler, K) the bundle does not list
                    skipped.append({"backend": b, "model": m.name, "batch": batch, "sampler": f"{sampler}-{k}",
                                    "reason": str(e)})
                    write(f"skipping {b} {m.name} B={batch} {sampler}-{k}: {e}")
                else:
                    rows.append(make_row(b, loaded.provider, m, "chunk", batch, sampler, k, times,
                                         m.chunk_flops(batch, k), peak))
                    if loops:  # measured inside the call: the timed chunks' median
                        rows[-1]["overhead_us_per_step"] = round(float(np.median(loops[-len(times):])) / k * 1e3, 2)
                        rows[-1]["overhead_parts_from"] = "internal"
                bar.update(1)
            rows.extend(part_rows(b, loaded, m, batch, s, peak))
        del loaded
    bar.close()
    add_overheads(rows)
    return {
        "format": "dpkit-bench",
        "format_version": 1,
        "quick": s.quick,
        "settings": {"models": list(s.models), "backends": list(s.backends), "batches": list(s.batches),
                     "samplers": [f"{a}-{k}" for a, k in s.samplers], "repeats": s.repeats, "warmup": s.warmup,
                     "row_seconds": s.row_seconds, "threads": s.threads},
        "machine": machine,
        "models": {m.name: {"params": m.params, "encoder_mflop": round(m.encoder_flops / 1e6, 3),
                            "denoiser_mflop": round(m.denoiser_flops / 1e6, 3), "bundle": str(m.bundle) if m.bundle else None,
                            "bundle_error": m.bundle_error} for m in models},
        "rows": rows,
        "skipped": skipped,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }


# --------------------------------------------------------------------------- reports


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# dpkit-bench{' (--quick)' if result['quick'] else ''}",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores, {m['threads']} threads used"
        f"{', GPU ' + m['cuda'] if m.get('cuda') else ''}); fp32 GEMM {m['gemm_fp32_gflops']} GFLOP/s, "
        f"memory copy {m['mem_gbps']} GB/s; load average {m.get('load_avg_1m')}; torch {m['torch']}, onnxruntime {m['onnxruntime']}; {m['date']}.",
        "",
        "Latency of one action chunk (encoder + K denoiser steps), random weights. `encoder` / `denoiser` rows "
        "are one call each. % peak: achieved GFLOP/s (FLOPs / p50) over the fp32 GEMM peak above. "
        "Overhead per step: torch/ort (chunk − encoder) / K − denoiser call, from separately timed p50s (noisy, "
        "can fall below 0); cpp measured inside each call by the C++ runtime (time outside the two networks / K).",
        "",
        "| model | backend | batch | sampler | K | p50 ms | p90 ms | p99 ms | mean ms | n | GFLOP/s | % peak | overhead µs/step |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {b: i for i, b in enumerate(BACKENDS)}
    kind_order = {"chunk": 0, "encoder": 1, "denoiser": 2}
    for r in sorted(result["rows"], key=lambda r: (r["model"], r["batch"], kind_order[r["kind"]], r["sampler"],
                                                     r["steps"], order.get(r["backend"], 99))):
        share = None if r.get("peak_share") is None else r["peak_share"] * 100
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['batch']} | {r['sampler']} | {r['steps'] or '–'} | "
            f"{_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['mean_ms'])} | {r['n']} | "
            f"{_fmt(r['gflops'], 1)} | {_fmt(share, 1)} | {_fmt(r.get('overhead_us_per_step'), 1)} |")
    if result["skipped"]:
        lines += ["", "Skipped:", ""]
        for sk in result["skipped"]:
            where = " ".join(str(sk[k]) for k in ("backend", "model", "batch", "sampler") if sk.get(k) is not None)
            lines.append(f"- {where}: {sk['reason']}")
    models = result["models"]
    lines += ["", "Models: " + "; ".join(
        f"{n} {v['params'] / 1e6:.1f} M params, encoder {v['encoder_mflop']:.1f} MFLOP, "
        f"denoiser {v['denoiser_mflop']:.1f} MFLOP per sample" for n, v in models.items()) + ".",
        f"Run took {result['elapsed_s']} s.", ""]
    return "\n".join(lines)


def plot_png(result: dict[str, Any]) -> bytes:
    """Per model (columns) and batch (rows): p50 chunk latency per backend, one bar per sampler-K, whisker to p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = [r for r in result["rows"] if r["kind"] == "chunk"]
    models = [m for m in result["models"] if any(r["model"] == m for r in chunks)] or list(result["models"])
    batches = sorted({r["batch"] for r in chunks}) or [1]
    samplers = sorted({(r["sampler"], r["steps"]) for r in chunks})
    fig, axes = plt.subplots(len(batches), len(models), figsize=(max(4.2 * len(models), 6.0), 3.2 * len(batches) + 0.4),
                             squeeze=False)
    width = 0.8 / max(len(samplers), 1)
    for i, batch in enumerate(batches):
        for j, model in enumerate(models):
            ax = axes[i][j]
            sel = [r for r in chunks if r["model"] == model and r["batch"] == batch]
            backends = [b for b in BACKENDS if any(r["backend"] == b for r in sel)]
            for k, (sampler, steps) in enumerate(samplers):
                xs, p50, up = [], [], []
                for x, b in enumerate(backends):
                    r = next((r for r in sel if r["backend"] == b and (r["sampler"], r["steps"]) == (sampler, steps)), None)
                    if r:
                        xs.append(x + (k - (len(samplers) - 1) / 2) * width)
                        p50.append(r["p50_ms"])
                        up.append(r["p99_ms"] - r["p50_ms"])
                if xs:
                    ax.bar(xs, p50, width, yerr=[np.zeros(len(up)), up], capsize=2, label=f"{sampler}-{steps}")
            ax.set_xticks(range(len(backends)), backends, rotation=30, ha="right")
            ax.set_yscale("log")
            ax.set_title(f"{model}, batch {batch}", fontsize=10)
            ax.set_ylabel("chunk latency p50 (ms)")
            ax.grid(axis="y", which="both", alpha=0.3)
            if sel:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center")
    m = result["machine"]
    fig.suptitle(f"dpkit-bench{' --quick' if result['quick'] else ''}: {m['cpu']}, {m['threads']} threads, "
                 f"{m['gemm_fp32_gflops']} GFLOP/s fp32 GEMM",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_results(result: dict[str, Any], out_dir: Path, json_path: Path | None = None) -> dict[str, Path]:
    """latency[_quick].{png,md,json} in `out_dir` (each atomically; JSON last), plus `json_path` if given."""
    stem = "latency_quick" if result["quick"] else "latency"
    paths = {"png": out_dir / f"{stem}.png", "md": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json"}
    atomic_write_bytes(paths["png"], plot_png(result))
    atomic_write_text(paths["md"], markdown_report(result))
    atomic_write_json(paths["json"], result)
    if json_path is not None:
        atomic_write_json(json_path, result)
        paths["extra_json"] = json_path
    return paths


# --------------------------------------------------------------------------- CLI


def _split(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.replace(",", " ").split()]


def parse_samplers(values: list[str]) -> tuple[tuple[str, int], ...]:
    """`ddpm-100 ddim-10` (or `ddim:10`) -> (("ddpm", 100), ("ddim", 10))."""
    out = []
    for v in values:
        kind, sep, k = v.replace(":", "-").partition("-")
        if kind not in ("ddpm", "ddim") or not sep or not k.isdigit() or int(k) < 1:
            raise DpkitError(f"--samplers entry {v!r} is not SAMPLER-K with SAMPLER ddpm or ddim (e.g. ddim-10)")
        out.append((kind, int(k)))
    return tuple(dict.fromkeys(out))


def settings_from_args(a: argparse.Namespace) -> Settings:
    if a.quick:
        # ~1 minute on 2 cores once the bundles are cached: the two low-dim models, batch 1 and a small
        # vectorized batch, DDIM-10 (the control setting; DDPM-100 chunks of the 65 M U-Net alone would
        # take a minute), few repeats and a tight per-row budget.
        s = Settings(models=("tiny", "pusht_lowdim"), batches=(1, 4), samplers=(("ddim", 10),), repeats=5,
                     warmup=1, row_seconds=2.0, min_repeats=2, quick=True)
    else:
        s = Settings()
    if a.models:
        s.models = tuple(_split(a.models))
        bad = [m for m in s.models if m not in MODELS]
        if bad:
            raise DpkitError(f"unknown model {bad[0]!r} (choose from: {', '.join(MODELS)})")
    if a.backends:
        s.backends = tuple(_split(a.backends))
        bad = [b for b in s.backends if b not in BACKENDS]
        if bad:
            raise DpkitError(f"unknown backend {bad[0]!r} (choose from: {', '.join(BACKENDS)})")
    if a.batch:
        try:
            s.batches = tuple(int(b) for b in _split(a.batch))
        except ValueError:
            raise DpkitError(f"--batch expects integers, got {' '.join(a.batch)!r}") from None
        if any(b < 1 for b in s.batches):
            raise DpkitError("--batch values must be >= 1")
    if a.samplers:
        s.samplers = parse_samplers(_split(a.samplers))
    for name in ("repeats", "warmup", "threads"):
        v = getattr(a, name)
        if v is not None:
            if v < (1 if name == "repeats" else 0):
                raise DpkitError(f"--{name} must be >= {1 if name == 'repeats' else 0}, got {v}")
            setattr(s, name, v)
    if a.row_seconds is not None:
        if a.row_seconds <= 0:
            raise DpkitError("--row-seconds must be > 0")
        s.row_seconds = a.row_seconds
    s.min_repeats = min(s.min_repeats, s.repeats)
    if not s.models or not s.backends or not s.batches or not s.samplers:
        raise DpkitError("nothing to run: --models, --backends, --batch and --samplers must not be empty")
    s.__post_init__()
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpkit-bench", description="Per-chunk latency of every dpkit backend.")
    p.add_argument("--quick", action="store_true", help="about a minute on 2 cores: tiny + pusht_lowdim, batch 1 and 4")
    p.add_argument("--models", nargs="+", help=f"any of {', '.join(MODELS)} (default: all)")
    p.add_argument("--backends", nargs="+", help=f"any of {', '.join(BACKENDS)} (default: all; missing ones are skipped)")
    p.add_argument("--batch", nargs="+", help="batch sizes (default: 1 50)")
    p.add_argument("--samplers", "--steps", dest="samplers", nargs="+",
                   help="SAMPLER-K entries, e.g. ddpm-100 ddim-10 (the default); the bundle must list them")
    p.add_argument("--repeats", type=int, help="timed chunks per row (default 20, quick 5)")
    p.add_argument("--warmup", type=int, help="untimed chunks before each row (default 1)")
    p.add_argument("--row-seconds", type=float, help="soft time budget per row (default 30, quick 2)")
    p.add_argument("--threads", type=int, help="intra-op threads for every backend (default: usable cores)")
    p.add_argument("--out-dir", default="benchmarks/results", help="where latency[_quick].{json,md,png} go")
    p.add_argument("--json", type=Path, help="also write the JSON here")
    p.add_argument("--cache-dir", default=os.environ.get("DPKIT_BENCH_CACHE", "benchmarks/.cache"),
                   help="random-weight checkpoints and bundles, reused across runs ($DPKIT_BENCH_CACHE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    s = settings_from_args(a)
    out_dir = Path(a.out_dir)
    # Fail on an unwritable destination before minutes of measuring.
    check_writable_file(out_dir / "latency.json")
    if a.json is not None:
        check_writable_file(a.json)
    result = run_benchmark(s, Path(a.cache_dir), progress=not a.no_progress)
    result["command"] = "dpkit-bench " + " ".join(sys.argv[1:] if argv is None else argv)
    paths = write_results(result, out_dir, a.json)
    print(markdown_report(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    main()
