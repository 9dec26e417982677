"""Per-chunk latency of every backend, on this machine, in one run (`dpkit-bench`).

    dpkit-bench --quick                                   # ~1 min on 2 cores: tiny + pusht_lowdim, B 1/4, DDIM-10
    dpkit-bench                                           # all models, batch 1 and 50, DDPM-100 / DDIM-10
    dpkit-bench --models tiny --backends ort cpp --batch 1 8 --samplers ddim-10 --json out.json
    dpkit-bench --quick --contention 1 --out-dir /tmp/b   # each row also beside 1 busy process, vs quiet
    dpkit-bench --models tiny --backends cpp --batch 1 --samplers ddim-10 --fewstep --precision fp32 int8
                                                          # + few-step student rows fewstep-1/-2, fp32 and int8

For each model (random weights: latency does not depend on training) it builds a checkpoint and a bundle
once (cached in `--cache-dir`), then times `policy.sample(obs, sampler, steps)` — one action chunk — for
every backend and batch, plus the encoder alone and one denoiser call, from which the per-step overhead
of each Python sampling loop follows: (chunk - encoder) / K - denoiser call; the C++ runtime times its own
networks inside each call, so its overhead is exact (and counts its denoiser calls: `denoiser_calls`). The same run measures the machine's
fp32 GEMM throughput and memory bandwidth and counts the model's FLOPs (torch's FlopCounterMode), so
every row also says what share of the GEMM peak it achieves — a number that carries to other machines.

Few-step rows: `fewstep-K` samplers (`--samplers ... fewstep-1 fewstep-2`, or `--fewstep` for both) are timed
on the same config built as a few-step student (dpkit.benchmarks.models.fewstep_student_config: the same
network with the fields dpkit-distill sets, timesteps 99 and 49) and exported, so they sit next to the
teacher's ddpm/ddim rows of the same model, precision and backend (row key `student`: true). `--precision
fp32 int8` also times int8 bundles (`export --precision int8`; row key `precision`; torch runs the fp32
checkpoint only).

Results go to `--out-dir` (default benchmarks/results/) as latency.json, latency.md and latency.png
(`latency_quick.*` for --quick, so a quick run never replaces a full one), each written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dpkit.benchmarks.contention import MAX_BUSY, BusyProcesses
from dpkit.benchmarks.report import png_bytes, pyplot
from dpkit.benchmarks.machine import latency_stats, machine_info, time_calls, usable_cores
from dpkit.benchmarks.models import (FEWSTEP_TIMESTEPS, PRECISIONS, SEED, ModelArtifacts, prepare_model,
                                     random_obs)
from dpkit.cli_args import add_common_args, apply_threads
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable_file
from dpkit.runtime.backend import PROVIDERS
from dpkit.sampling_args import parse_sampler_label
from dpkit.threads import ThreadChoice, choose_threads

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
# provider -> the ONNX Runtime provider that must be present (the runtime's one table: runtime/backend.py)
ORT_PROVIDERS = {name: chain[0] for name, chain in PROVIDERS.items()}
DEFAULT_SAMPLERS = ("ddpm-100", "ddim-10")
BUSY_MAX_S = 4 * 3600.0
"""Longest a --contention busy process lives if the benchmark dies without stopping it."""


@dataclass
class Settings:
    models: tuple[str, ...] = MODELS
    backends: tuple[str, ...] = tuple(BACKENDS)
    batches: tuple[int, ...] = (1, 50)
    samplers: tuple[tuple[str, int], ...] = (("ddpm", 100), ("ddim", 10))
    """("fewstep", K) entries are timed on each model's few-step student, the others on the model itself."""
    precisions: tuple[str, ...] = ("fp32",)
    """Bundle precisions of the bundle backends (ort, cpp); torch runs the fp32 checkpoint only."""
    repeats: int = 20
    """Timed chunks per row (fewer when `row_seconds` runs out first; never fewer than `min_repeats`)."""
    warmup: int = 1
    row_seconds: float = 30.0
    """Soft time budget per row: a 65 M U-Net at batch 50 with 100 steps takes seconds per chunk on 2 cores."""
    min_repeats: int = 3
    threads: int = 0
    """Intra-op threads for every backend (0: dpkit.threads' choice for each model; see `model_threads`)."""
    contention: int = 0
    """Busy processes to run beside a second measurement of every chunk row (0: quiet rows only)."""
    quick: bool = False

    def __post_init__(self) -> None:
        self.threads = max(0, int(self.threads))

    def model_threads(self, params: int | None) -> ThreadChoice:
        """The threads every backend of one model gets: --threads, else the rule for the model's size."""
        return choose_threads(self.threads, params=params)


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


def _torch_policy_class():
    """TorchPolicy with the timing parts of the PolicyBackend contract (encoder_call, denoiser_call, sync).

    The other backends implement these in dpkit.runtime; the torch ones are here until they move into
    runtime/torch_policy.py (which imports torch lazily, as this does)."""
    import torch

    from dpkit.runtime.torch_policy import TorchPolicy

    class BenchTorchPolicy(TorchPolicy):
        def __init__(self, path, device: str = "cpu"):
            super().__init__(path, device=device)
            self.device = device
            self.provider = device

        def sync(self) -> None:
            if self.device == "cuda":
                torch.cuda.synchronize()

        def _encode(self, obs):
            with torch.no_grad():
                return self.policy.encoder(*[torch.from_numpy(obs[k]).to(self.device) for k in self.obs_keys])

        def encoder_call(self, obs):
            return lambda: self._encode(obs)

        def denoiser_call(self, obs, timestep: int = 50, seed: int = 0):
            cond = self._encode(obs)
            batch = len(cond)
            x = torch.randn(batch, self.horizon, self.action_dim, device=self.device)
            t = torch.full((batch,), timestep, dtype=torch.int64, device=self.device)

            def call():
                with torch.no_grad():
                    self.policy.denoiser(x, t, cond)
            return call

    return BenchTorchPolicy


def load_backend(backend: str, model: ModelArtifacts, threads: int, max_batch: int, precision: str = "fp32"):
    """The PolicyBackend one bench row times: `sample`, and the parts (encoder_call, denoiser_call, sync,
    last_loop_ms, provider) that dpkit.runtime.backend.PolicyBackend defines for every backend."""
    from dpkit.runtime import load_policy

    kind, provider = BACKENDS[backend]
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
        return _torch_policy_class()(model.checkpoint, device="cuda" if provider == "cuda" else "cpu")

    bundle, error = model.bundle_for(precision)
    if bundle is None:
        who = f"{model.name}'s few-step student" if model.student else model.name
        raise BackendUnavailable(f"no {'' if precision == 'fp32' else precision + ' '}bundle for {who}: {error}")
    if kind == "ort":
        # provider= is the runtime's one name: a provider ONNX Runtime would silently replace by CPU is an
        # error there, which skips these rows (the "tensorrt" bundle engine options are OrtPolicy's).
        try:
            return load_policy(bundle, backend="ort", provider=provider, threads=threads)
        except DpkitError as e:
            if "is not available" in str(e):
                raise BackendUnavailable(str(e)) from None
            raise
    # Buffers are preallocated for max_batch; an unavailable provider is an error there, not a fallback.
    return load_policy(bundle, backend="cpp", provider=provider, threads=threads, max_batch=max_batch)


# --------------------------------------------------------------------------- the run


def part_rows(backend: str, loaded: Any, model: ModelArtifacts, batch: int, s: Settings,
              peak: float, precision: str = "fp32") -> list[dict[str, Any]]:
    """The encoder alone and one denoiser call, timed on the backend's own sessions/modules (`loaded`: a
    PolicyBackend; a backend that exposes neither part, cpp, has no part rows)."""
    rows = []
    obs = random_obs(model, batch)
    encode = loaded.encoder_call(obs)
    if encode is None:
        return rows
    denoise = loaded.denoiser_call(obs, timestep=50, seed=SEED)
    if denoise is None:
        return rows
    parts = [("encoder", 0, encode, model.encoder_flops), ("denoiser", 1, denoise, model.denoiser_flops)]
    for kind, steps, fn, flops in parts:
        # One call is short: many repeats cost little and steady the median the overhead is computed from.
        times = time_calls(fn, repeats=max(s.repeats, 30), warmup=max(s.warmup, 3), budget_s=min(s.row_seconds, 5.0),
                           min_repeats=s.min_repeats, sync=loaded.sync)
        rows.append(make_row(backend, loaded.provider, model, kind, batch, kind, steps, times, batch * flops, peak,
                             precision=precision))
    return rows


def make_row(backend: str, provider: str, model: ModelArtifacts, kind: str, batch: int, sampler: str, steps: int,
             times: list[float], flops: int, peak: float, precision: str = "fp32") -> dict[str, Any]:
    st = latency_stats(times)
    # The low-dim encoder is only a normalization: no matmul/conv FLOPs, so no meaningful rate.
    gflops = flops / (st["p50_ms"] / 1e3) / 1e9 if flops else None
    return {"backend": backend, "provider": provider, "model": model.name, "kind": kind, "batch": batch,
            "sampler": sampler, "steps": steps, **{k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()},
            "gflop_per_chunk": round(flops / 1e9, 4), "gflops": None if gflops is None else round(gflops, 2),
            "peak_share": round(gflops / peak, 4) if peak and gflops is not None else None,
            "precision": precision, "student": bool(getattr(model, "student", False))}


def add_overheads(rows: list[dict[str, Any]]) -> None:
    """Per-step loop overhead of each chunk row without one: (chunk - encoder) / K - denoiser call (µs).

    From p50s of separately timed parts on the backend's own modules/sessions, so on a noisy machine the
    difference can come out below zero. Rows that measured it inside the call keep theirs: the C++ runtime
    times its networks itself (`overhead_parts_from` = "internal"), which is exact per call.
    """
    # A few-step student has its teacher's network: one (model, precision)'s parts serve both.
    parts = {(r["backend"], r["model"], r.get("precision", "fp32"), r["batch"], r["kind"]): r["p50_ms"]
             for r in rows if r["kind"] != "chunk"}
    for r in rows:
        if r["kind"] != "chunk" or r.get("overhead_us_per_step") is not None:
            continue
        if r.get("contention"):  # the parts were timed quiet: no difference to take
            r["overhead_us_per_step"] = None
            continue
        src = r["backend"]
        prec = r.get("precision", "fp32")
        enc = parts.get((src, r["model"], prec, r["batch"], "encoder"))
        den = parts.get((src, r["model"], prec, r["batch"], "denoiser"))
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
    prep = choose_threads(s.threads)  # building the cached models: --threads, else the rule's 1
    try:  # every torch step before the rows (checkpoint, export, FLOP count) uses these threads
        import torch

        torch.set_num_threads(prep.threads)
    except ImportError:
        pass
    # The roofline is the machine's: measured on every usable core unless --threads says otherwise.
    gemm_threads = s.threads or usable_cores()
    log(f"measuring the machine (fp32 GEMM, memory copy) with {gemm_threads} threads")
    machine = machine_info(gemm_threads, s.quick)
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
    teacher_samplers = tuple(sk for sk in s.samplers if sk[0] != "fewstep")
    student_samplers = tuple(sk for sk in s.samplers if sk[0] == "fewstep")
    # (artifacts, the samplers timed on them): a config itself for ddpm/ddim, its few-step student for fewstep.
    prepared: list[tuple[ModelArtifacts, tuple[tuple[str, int], ...]]] = []
    for name in s.models:
        if teacher_samplers:
            prepared.append((prepare_model(name, cache_dir, log, need_bundle, precisions=s.precisions),
                             teacher_samplers))
        if student_samplers:
            prepared.append((prepare_model(name, cache_dir, log, need_bundle, fewstep=True, precisions=s.precisions),
                             student_samplers))
    for m, _ in prepared:
        for prec in s.precisions:
            error = m.bundle_for(prec)[1]
            if error and need_bundle:
                log(f"[{m.name}{' few-step student' if m.student else ''} {prec}] {error}")
    models = {}  # name -> the config's artifacts (its student's when only fewstep rows were asked for)
    for m, _ in prepared:
        models.setdefault(m.name, m)

    plan = []  # (artifacts, samplers, backend, precision, whether to time the encoder/denoiser parts)
    for m, samplers in prepared:
        for b in backends:
            for prec in s.precisions:
                if BACKENDS[b][0] == "torch" and prec != "fp32":
                    continue  # the torch backend runs the checkpoint: precision is a bundle's (skipped below)
                # A student has its teacher's network: the teacher's parts serve both when both are timed.
                plan.append((m, samplers, b, prec, not (m.student and teacher_samplers)))
    for b in backends:
        for prec in s.precisions:
            if BACKENDS[b][0] == "torch" and prec != "fp32":
                skipped.append({"backend": b, "model": None, "precision": prec,
                                "reason": f"{prec} is a bundle precision: the torch backend runs the fp32 checkpoint"})
    phases = (0, s.contention) if s.contention else (0,)
    n_rows = sum(len(s.batches) * len(samplers) * len(phases) for _, samplers, *_ in plan)
    rows: list[dict[str, Any]] = []
    per_model = {n: s.model_threads(m.params) for n, m in models.items()}
    bar = tqdm(total=n_rows, desc="dpkit-bench", unit="row", disable=not progress, dynamic_ncols=True)
    write = bar.write if progress else log
    # Busy processes (paused unless a contended row runs): each row's quiet and busy figures back to back.
    with BusyProcesses(s.contention, max_seconds=BUSY_MAX_S) as busy:
        _measure(s, plan, per_model, machine, busy, phases, rows, skipped, bar, write)
    bar.close()
    add_overheads(rows)
    add_vs_quiet(rows)
    students = {m.name: m for m, _ in prepared if m.student}
    return {
        "format": "dpkit-bench",
        "format_version": 1,
        "quick": s.quick,
        "contention": s.contention,
        "settings": {"models": list(s.models), "backends": list(s.backends), "batches": list(s.batches),
                     "samplers": [f"{a}-{k}" for a, k in s.samplers], "repeats": s.repeats, "warmup": s.warmup,
                     "row_seconds": s.row_seconds, "threads": s.threads, "contention": s.contention,
                     "precisions": list(s.precisions)},
        "machine": machine,
        "threads": {**prep.to_json(), "per_model": {n: c.threads for n, c in per_model.items()},
                    "per_model_reason": {n: c.reason for n, c in per_model.items()}},
        "models": {n: {"params": m.params, "threads": per_model[n].threads,
                       "encoder_mflop": round(m.encoder_flops / 1e6, 3),
                       "denoiser_mflop": round(m.denoiser_flops / 1e6, 3),
                       "bundle": str(m.bundle) if m.bundle else None,
                       "bundle_error": m.bundle_error,
                       "bundles": _bundles_json(m, s.precisions),
                       **({"fewstep_student": {"fewstep_timesteps": list(students[n].fewstep_timesteps),
                                               "bundles": _bundles_json(students[n], s.precisions)}}
                          if n in students else {})} for n, m in models.items()},
        "rows": rows,
        "skipped": skipped,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }


def _bundles_json(m: ModelArtifacts, precisions: tuple[str, ...]) -> dict[str, Any]:
    """precision -> {"bundle": path or None, "bundle_error": why not or None}."""
    out = {}
    for prec in precisions:
        bundle, error = m.bundle_for(prec)
        out[prec] = {"bundle": str(bundle) if bundle else None, "bundle_error": error}
    return out


def _measure(s: Settings, plan, per_model, machine, busy: BusyProcesses, phases: tuple[int, ...],
             rows: list[dict[str, Any]], skipped: list[dict[str, Any]], bar, write) -> None:
    """Every chunk row once per phase (0: quiet; N: beside N running busy processes), then the parts."""
    for m, samplers, b, prec, with_parts in plan:
        peak = machine.get("gpu_gemm_fp32_gflops") if BACKENDS[b][1] != "cpu" else machine["gemm_fp32_gflops"]
        who = f"{m.name}{' (few-step student)' if m.student else ''}{'' if prec == 'fp32' else ' ' + prec}"
        try:
            loaded = load_backend(b, m, per_model[m.name].threads, max(s.batches), prec)
        except (BackendUnavailable, DpkitError) as e:
            skipped.append({"backend": b, "model": m.name, "precision": prec, "reason": str(e),
                            **({"samplers": [f"{a}-{k}" for a, k in samplers]} if m.student else {})})
            write(f"skipping {b} on {who}: {e}")
            bar.update(len(s.batches) * len(samplers) * len(phases))
            continue
        for batch in s.batches:
            obs = random_obs(m, batch)
            for (sampler, k), phase in ((sk, ph) for sk in samplers for ph in phases):
                bar.set_postfix_str(f"{m.name} {b} {prec} B={batch} {sampler}-{k}" + (f" +{phase} busy" if phase else ""))
                loops: list[float] = []
                calls: list[int] = []
                if phase:
                    busy.run()

                def chunk() -> None:
                    loaded.sample(obs, sampler=sampler, steps=k, seed=SEED)
                    loop_ms = loaded.last_loop_ms
                    if loop_ms is not None:
                        loops.append(loop_ms)
                        timing = getattr(loaded, "last_timing", None)  # cpp: its own count of denoiser runs
                        if isinstance(timing, dict) and "steps" in timing:
                            calls.append(int(timing["steps"]))
                try:
                    times = time_calls(chunk, s.repeats, s.warmup, s.row_seconds, s.min_repeats, loaded.sync)
                except DpkitError as e:  # e.g. a (sampler, K) the bundle does not list
                    busy.pause()
                    if phase:
                        bar.update(1)
                        continue
                    skipped.append({"backend": b, "model": m.name, "batch": batch, "sampler": f"{sampler}-{k}",
                                    "precision": prec, "reason": str(e)})
                    write(f"skipping {b} {who} B={batch} {sampler}-{k}: {e}")
                else:
                    rows.append(make_row(b, loaded.provider, m, "chunk", batch, sampler, k, times,
                                         m.chunk_flops(batch, k), peak, precision=prec))
                    rows[-1]["threads"] = per_model[m.name].threads
                    rows[-1]["contention"] = phase
                    if loops:  # measured inside the call: the timed chunks' median
                        rows[-1]["overhead_us_per_step"] = round(float(np.median(loops[-len(times):])) / k * 1e3, 2)
                        rows[-1]["overhead_parts_from"] = "internal"
                    if calls:
                        rows[-1]["denoiser_calls"] = calls[-1]
                busy.pause()
                bar.update(1)
            if with_parts:
                rows.extend(part_rows(b, loaded, m, batch, s, peak, precision=prec))
        del loaded


def add_vs_quiet(rows: list[dict[str, Any]]) -> None:
    """Each contended chunk row's p50/p99 over the quiet row's of the same run (`vs_quiet_p50`, `_p99`)."""
    def key(r):
        return r["backend"], r["model"], r.get("precision", "fp32"), r["kind"], r["batch"], r["sampler"], r["steps"]

    quiet = {key(r): r for r in rows if not r.get("contention")}
    for r in rows:
        q = quiet.get(key(r)) if r.get("contention") else None
        if q is not None:
            r["vs_quiet_p50"] = round(r["p50_ms"] / q["p50_ms"], 3)
            r["vs_quiet_p99"] = round(r["p99_ms"] / q["p99_ms"], 3)


# --------------------------------------------------------------------------- reports


def _threads_of(model: dict[str, Any]) -> str:
    n = model.get("threads")
    return "threads ?" if n is None else f"{n} thread{'s' if n != 1 else ''}, no spinning"


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
        f"Machine: {m['cpu']} ({m['cores']} cores, GEMM on {m['threads']} threads"
        f"{', GPU ' + m['cuda'] if m.get('cuda') else ''}); fp32 GEMM {m['gemm_fp32_gflops']} GFLOP/s, "
        f"{'GPU fp32 GEMM ' + str(m['gpu_gemm_fp32_gflops']) + ' GFLOP/s, ' if m.get('gpu_gemm_fp32_gflops') else ''}"
        f"memory copy {m['mem_gbps']} GB/s; load average {m.get('load_avg_1m')}; torch {m['torch']}, onnxruntime {m['onnxruntime']}; {m['date']}.",
        "",
        "Latency of one action chunk (encoder + K denoiser steps), random weights. `encoder` / `denoiser` rows "
        "are one call each. % peak: achieved GFLOP/s (FLOPs / p50) over the fp32 GEMM peak above (the GPU's for "
        "the GPU backends). "
        "Overhead per step: torch/ort (chunk − encoder) / K − denoiser call, from separately timed p50s (noisy, "
        "can fall below 0); cpp measured inside each call by the C++ runtime (time outside the two networks / K). "
        "fewstep rows: the same network as a few-step student (K denoiser calls per chunk); precision: the bundle's.",
        "",
        "| model | backend | batch | sampler | K | p50 ms | p90 ms | p99 ms | mean ms | n | GFLOP/s | % peak | overhead µs/step "
        "| precision |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {b: i for i, b in enumerate(BACKENDS)}
    kind_order = {"chunk": 0, "encoder": 1, "denoiser": 2}
    quiet = [r for r in result["rows"] if not r.get("contention")]
    for r in sorted(quiet, key=lambda r: (r["model"], _prec_order(r), r["batch"], kind_order[r["kind"]],
                                          r["sampler"], r["steps"], order.get(r["backend"], 99))):
        share = None if r.get("peak_share") is None else r["peak_share"] * 100
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['batch']} | {r['sampler']} | {r['steps'] or '–'} | "
            f"{_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['mean_ms'])} | {r['n']} | "
            f"{_fmt(r['gflops'], 1)} | {_fmt(share, 1)} | {_fmt(r.get('overhead_us_per_step'), 1)} | "
            f"{r.get('precision', 'fp32')} |")
    lines += fewstep_table(result)
    lines += contention_table(result)
    if result["skipped"]:
        lines += ["", "Skipped:", ""]
        for sk in result["skipped"]:
            where = " ".join(str(sk[k]) for k in ("backend", "model", "precision", "batch", "sampler")
                             if sk.get(k) is not None)
            lines.append(f"- {where}: {sk['reason']}")
    models = result["models"]
    lines += ["", "Models: " + "; ".join(
        f"{n} {v['params'] / 1e6:.1f} M params ({_threads_of(v)}), encoder {v['encoder_mflop']:.1f} MFLOP, "
        f"denoiser {v['denoiser_mflop']:.1f} MFLOP per sample" for n, v in models.items()) + ".",
        f"Run took {result['elapsed_s']} s.", ""]
    return "\n".join(lines)


def _prec_order(r: dict[str, Any]) -> int:
    prec = r.get("precision", "fp32")
    return PRECISIONS.index(prec) if prec in PRECISIONS else len(PRECISIONS)


FEWSTEP_BASELINE = ("ddim", 10)
"""The teacher's row each few-step row is compared with (issue 16: the control setting, DDIM-10)."""


def fewstep_table(result: dict[str, Any]) -> list[str]:
    """Markdown: each quiet fewstep-K chunk row against the teacher's DDIM-10 row of the same model, backend,
    precision and batch (when the run timed it)."""
    quiet = [r for r in result["rows"] if r["kind"] == "chunk" and not r.get("contention")]
    few = [r for r in quiet if r["sampler"] == "fewstep"]
    if not few:
        return []

    def key(r):
        return r["model"], r["backend"], r.get("precision", "fp32"), r["batch"]

    base = {key(r): r for r in quiet if (r["sampler"], r["steps"]) == FEWSTEP_BASELINE}
    name = f"{FEWSTEP_BASELINE[0]}-{FEWSTEP_BASELINE[1]}"
    timesteps = {n: v["fewstep_student"]["fewstep_timesteps"] for n, v in result.get("models", {}).items()
                 if v.get("fewstep_student")}
    lines = ["", f"Few-step student rows against the teacher's {name} (same model, backend, precision and batch; "
             f"random weights; student timesteps {', '.join(f'{n}: {ts}' for n, ts in timesteps.items()) or '–'}):",
             "", f"| model | backend | precision | batch | sampler | denoiser calls | p50 ms | p99 ms | {name} p50 ms | "
             f"{name} / fewstep p50 |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    order = {b: i for i, b in enumerate(BACKENDS)}
    for r in sorted(few, key=lambda r: (r["model"], _prec_order(r), r["batch"], order.get(r["backend"], 99), r["steps"])):
        b = base.get(key(r))
        lines.append(f"| {r['model']} | {r['backend']} | {r.get('precision', 'fp32')} | {r['batch']} | "
                     f"{r['sampler']}-{r['steps']} | {_fmt(r.get('denoiser_calls'))} | {_fmt(r['p50_ms'])} | "
                     f"{_fmt(r['p99_ms'])} | {_fmt(b['p50_ms'] if b else None)} | "
                     f"{_fmt(b['p50_ms'] / r['p50_ms'] if b else None, 1)} |")
    return lines


def contention_table(result: dict[str, Any]) -> list[str]:
    """Markdown: each chunk row beside N busy processes against its quiet figure from the same run."""
    busy = [r for r in result["rows"] if r.get("contention") and "vs_quiet_p50" in r]
    if not busy:
        return []
    n = result.get("contention")
    quiet = {(r["backend"], r["model"], r.get("precision", "fp32"), r["batch"], r["sampler"], r["steps"]): r
             for r in result["rows"] if r["kind"] == "chunk" and not r.get("contention")}
    lines = ["", f"Beside {n} busy process{'es' if n != 1 else ''} (single-threaded loops, each in its own session, "
             "paused while the quiet figure of the same row was measured just before):", "",
             "| model | backend | batch | sampler | threads | quiet p50 ms | busy p50 ms | × | quiet p99 ms | "
             "busy p99 ms | × |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(busy, key=lambda r: (r["model"], r["batch"], r["sampler"], r["steps"], r["backend"])):
        prec = r.get("precision", "fp32")
        q = quiet[(r["backend"], r["model"], prec, r["batch"], r["sampler"], r["steps"])]
        lines.append(f"| {r['model']} | {r['backend']}{'' if prec == 'fp32' else ' ' + prec} | {r['batch']} | {r['sampler']}-{r['steps']} | "
                     f"{r.get('threads', '–')} | {_fmt(q['p50_ms'])} | {_fmt(r['p50_ms'])} | "
                     f"{r['vs_quiet_p50']:.2f} | {_fmt(q['p99_ms'])} | {_fmt(r['p99_ms'])} | {r['vs_quiet_p99']:.2f} |")
    return lines


def plot_png(result: dict[str, Any]) -> bytes:
    """Per model (columns) and batch (rows): p50 chunk latency per backend, one bar per sampler-K, whisker to p99."""
    plt = pyplot()

    chunks = [r for r in result["rows"] if r["kind"] == "chunk" and not r.get("contention")]
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
            backends = [(b, p) for p in PRECISIONS for b in BACKENDS
                        if any(r["backend"] == b and r.get("precision", "fp32") == p for r in sel)]
            for k, (sampler, steps) in enumerate(samplers):
                xs, p50, up = [], [], []
                for x, (b, p) in enumerate(backends):
                    r = next((r for r in sel if r["backend"] == b and r.get("precision", "fp32") == p
                              and (r["sampler"], r["steps"]) == (sampler, steps)), None)
                    if r:
                        xs.append(x + (k - (len(samplers) - 1) / 2) * width)
                        p50.append(r["p50_ms"])
                        up.append(r["p99_ms"] - r["p50_ms"])
                if xs:
                    ax.bar(xs, p50, width, yerr=[np.zeros(len(up)), up], capsize=2, label=f"{sampler}-{steps}")
            ax.set_xticks(range(len(backends)), [b if p == "fp32" else f"{b} {p}" for b, p in backends],
                          rotation=30, ha="right")
            ax.set_yscale("log")
            ax.set_title(f"{model}, batch {batch}", fontsize=10)
            ax.set_ylabel("chunk latency p50 (ms)")
            ax.grid(axis="y", which="both", alpha=0.3)
            if sel:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center")
    m = result["machine"]
    fig.suptitle(f"dpkit-bench{' --quick' if result['quick'] else ''}: {m['cpu']}, GEMM on {m['threads']} threads, "
                 f"{m['gemm_fp32_gflops']} GFLOP/s fp32 GEMM",
                 fontsize=10)
    return png_bytes(fig)


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
    return tuple(dict.fromkeys(parse_sampler_label(v, "--samplers entry") for v in values))


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
    if a.fewstep:
        s.samplers = tuple(dict.fromkeys(s.samplers + tuple(("fewstep", k) for k in range(1, len(FEWSTEP_TIMESTEPS) + 1))))
    for kind, k in s.samplers:
        if kind == "fewstep" and k > len(FEWSTEP_TIMESTEPS):
            raise DpkitError(f"--samplers entry 'fewstep-{k}': the bench's few-step student has "
                             f"{len(FEWSTEP_TIMESTEPS)} timesteps {list(FEWSTEP_TIMESTEPS)} "
                             f"(fewstep-1 .. fewstep-{len(FEWSTEP_TIMESTEPS)})")
    if a.precision:
        s.precisions = tuple(dict.fromkeys(_split(a.precision)))
        bad = [p for p in s.precisions if p not in PRECISIONS]
        if bad:
            raise DpkitError(f"unknown precision {bad[0]!r} (choose from: {', '.join(PRECISIONS)})")
    for name in ("repeats", "warmup", "threads"):
        v = getattr(a, name)
        if v is not None:
            if v < (1 if name == "repeats" else 0):
                raise DpkitError(f"--{name} must be >= {1 if name == 'repeats' else 0}, got {v}")
            setattr(s, name, v)
    if not 0 <= a.contention <= MAX_BUSY:
        raise DpkitError(f"--contention must be in [0, {MAX_BUSY}], got {a.contention}")
    s.contention = a.contention
    if a.row_seconds is not None:
        if a.row_seconds <= 0:
            raise DpkitError("--row-seconds must be > 0")
        s.row_seconds = a.row_seconds
    s.min_repeats = min(s.min_repeats, s.repeats)
    if not s.models or not s.backends or not s.batches or not s.samplers:
        raise DpkitError("nothing to run: --models, --backends, --batch and --samplers must not be empty")
    if not s.precisions:
        raise DpkitError("nothing to run: --precision must not be empty")
    s.__post_init__()
    return s


def check_measured(result: dict[str, Any]) -> None:
    """A requested sampler with no chunk row in any backend is an error (e.g. `ddim-7` that no bundle lists),
    not an empty table with exit 0. Nothing is written then; the skip reasons say why."""
    measured = {f"{r['sampler']}-{r['steps']}" for r in result["rows"] if r["kind"] == "chunk"}
    missing = [name for name in result["settings"]["samplers"] if name not in measured]
    if missing:
        reasons = sorted({s["reason"] for s in result["skipped"]
                          if s.get("sampler") in missing or s.get("sampler") is None})
        raise DpkitError(f"nothing was measured for {', '.join(missing)}"
                         + (f": {reasons[0]}" + (f" (and {len(reasons) - 1} more reasons)" if len(reasons) > 1 else "")
                            if reasons else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpkit-bench", description="Per-chunk latency of every dpkit backend.")
    p.add_argument("--quick", action="store_true", help="about a minute on 2 cores: tiny + pusht_lowdim, batch 1 and 4")
    p.add_argument("--models", nargs="+", help=f"any of {', '.join(MODELS)} (default: all)")
    p.add_argument("--backends", nargs="+", help=f"any of {', '.join(BACKENDS)} (default: all; missing ones are skipped)")
    p.add_argument("--batch", nargs="+", help="batch sizes (default: 1 50)")
    p.add_argument("--samplers", "--steps", dest="samplers", nargs="+", metavar="SAMPLER-K",
                   help="samplers with their denoising steps K per chunk, as labels: ddpm-100 ddim-10 (the default); "
                        "the bundle must list them (--steps: the older name); fewstep-1 fewstep-2 are timed on the "
                        "model's few-step student")
    p.add_argument("--fewstep", action="store_true",
                   help=f"also time fewstep-1 .. fewstep-{len(FEWSTEP_TIMESTEPS)}: each model built as a few-step student "
                        f"(same network, timesteps {list(FEWSTEP_TIMESTEPS)}, random weights) and exported; the same "
                        "as adding those labels to --samplers")
    p.add_argument("--precision", nargs="+", metavar="PRECISION",
                   help=f"bundle precisions for the ort/cpp rows: any of {', '.join(PRECISIONS)} (default fp32; "
                        "torch runs the fp32 checkpoint only)")
    p.add_argument("--repeats", type=int, help="timed chunks per row (default 20, quick 5)")
    p.add_argument("--warmup", type=int, help="untimed chunks before each row (default 1)")
    p.add_argument("--row-seconds", type=float, help="soft time budget per row (default 30, quick 2)")
    p.add_argument("--contention", type=int, default=0, metavar="N",
                   help="also time every chunk row beside N busy processes (each in its own session, as other "
                        "programs are) and report it against the quiet figure of the same run (default 0)")
    p.add_argument("--out-dir", default="benchmarks/results", help="where latency[_quick].{json,md,png} go")
    p.add_argument("--cache-dir", default=os.environ.get("DPKIT_BENCH_CACHE", "benchmarks/.cache"),
                   help="random-weight checkpoints and bundles, reused across runs ($DPKIT_BENCH_CACHE)")
    # --threads (0: dpkit.threads' choice per model), --no-progress, --json PATH, --version
    add_common_args(p, json="also write the result here (besides --out-dir)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    apply_threads(a)
    s = settings_from_args(a)
    out_dir = Path(a.out_dir)
    # Fail on an unwritable destination before minutes of measuring.
    check_writable_file(out_dir / "latency.json")
    if a.json is not None:
        check_writable_file(a.json)
    result = run_benchmark(s, Path(a.cache_dir), progress=not a.no_progress)
    check_measured(result)
    result["command"] = "dpkit-bench " + " ".join(sys.argv[1:] if argv is None else argv)
    paths = write_results(result, out_dir, None if a.json is None else Path(a.json))
    print(markdown_report(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    main()
