"""fp32 vs int8 bundles in one run: denoiser call, encoder and DDIM-10 chunk, against the memory-bound limit.

    python -m dpkit.benchmarks.bench_precision                              # tiny, pusht_lowdim, pusht_image
    python -m dpkit.benchmarks.bench_precision --configs tiny --batches 1 --quick
    python -m dpkit.benchmarks.bench_precision --torch-compile              # also the torch.compile peer

For each config (random weights: latency does not depend on training) the fp32 bundle comes from the
benchmark cache (dpkit.benchmarks.models) and the int8 bundle from `export_bundle(..., precision="int8")`
beside it. The "ort" (Python ONNX Runtime) and "cpp" (C++ runtime) backends are timed at each batch:
one denoiser call, the encoder alone, and a whole DDIM-10 chunk; fp32 and int8 rows are measured in
alternating rounds (fp32, int8, fp32, int8, ...) so that the machine's background load hits both alike:
on a shared machine compare the *ratio* within one run, not absolute numbers across runs. PyTorch eager
(and `torch.compile` with --torch-compile) give the fp32 peer rows of one denoiser call.

Memory-bound limit: at batch 1 each denoiser call reads every weight at least once, so
`weight bytes / measured memory bandwidth` (the copy bandwidth of dpkit.benchmarks.machine, measured in
the same run) is the fastest a call can be; `share` = limit / measured p50 says how close a row is.
Writes results JSON + markdown (default benchmarks/results/int8/precision.{json,md}).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dpkit.benchmarks.machine import latency_stats, machine_info, time_calls
from dpkit.benchmarks.models import SEED, ModelArtifacts, prepare_model, random_obs
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_json, atomic_write_text

CONFIGS = ("tiny", "pusht_lowdim", "pusht_image")
PRECISIONS = ("fp32", "int8")
BACKENDS = ("ort", "cpp")


def int8_bundle(model: ModelArtifacts, log: Callable[[str], None]) -> tuple[Path | None, str | None, dict | None]:
    """The int8 bundle beside the cached fp32 one: (path, error, quantization_error)."""
    from dpkit.export.writer import export_bundle
    from dpkit.runtime.bundle import load_bundle

    out = model.bundle.parent / "bundle-int8"
    if not (out / "policy.json").is_file():
        log(f"[{model.name}] exporting the int8 bundle to {out}")
        lines: list[str] = []
        try:
            export_bundle(model.checkpoint, out, precision="int8", force=True, log=lines.append)
        except DpkitError as e:
            for line in lines:
                log(line)
            return None, str(e), None
    m = load_bundle(out, verify_sha256=False).manifest
    return out, None, m["export"].get("quantization_error")


def graph_weight_bytes(bundle: Path) -> int:
    from dpkit.export.quantize import weight_bytes

    return weight_bytes(bundle / "denoiser.onnx")


def _loaders(backend: str, bundle: Path, model: ModelArtifacts, threads: int, max_batch: int):
    """(policy, {part: batch -> zero-argument call}) for one backend and bundle."""
    from dpkit.runtime import load_policy

    if backend == "ort":
        pol = load_policy(bundle, backend="ort", threads=threads)

        def denoiser(batch):
            cond = pol.encode(random_obs(model, batch))
            x = np.random.default_rng(SEED).standard_normal((batch, model.horizon, model.action_dim), dtype=np.float32)
            binding = pol.denoiser.io_binding()
            for name, value in (("sample", x), ("timestep", np.full((batch,), 50, np.int64)), ("cond", cond)):
                binding.bind_cpu_input(name, value)
            binding.bind_output("noise_pred")
            return lambda: pol.denoiser.run_with_iobinding(binding)
    else:
        pol = load_policy(bundle, backend="cpp", threads=threads, max_batch=max_batch)
        denoiser = None  # the C++ runtime's own timer gives the denoiser share of a chunk

    def encoder(batch):
        obs = random_obs(model, batch)
        return lambda: pol.encode(obs)

    def chunk(batch):
        obs = random_obs(model, batch)
        return lambda: pol.sample(obs, sampler="ddim", steps=10, seed=0)

    parts = {"chunk_ddim10": chunk}
    if backend == "ort":
        parts.update({"denoiser": denoiser, "encoder": encoder})
    return pol, parts


def measure_config(name: str, cache: Path, batches: list[int], threads: int, rounds: int, row_seconds: float,
                   torch_compile: bool, log: Callable[[str], None]) -> dict[str, Any]:
    model = prepare_model(name, cache, log=log)
    out: dict[str, Any] = {"config": name, "params": model.params, "rows": [], "skipped": []}
    if model.bundle is None:
        out["skipped"].append(f"fp32 bundle: {model.bundle_error}")
        return out
    q_bundle, q_err, q_error = int8_bundle(model, log)
    bundles = {"fp32": model.bundle}
    if q_bundle is None:
        out["skipped"].append(f"int8 bundle: {q_err}")
    else:
        bundles["int8"] = q_bundle
        out["quantization_error"] = q_error
    out["denoiser_weight_bytes"] = {p: graph_weight_bytes(b) for p, b in bundles.items()}
    out["file_bytes"] = {p: (b / "denoiser.onnx").stat().st_size for p, b in bundles.items()}
    max_batch = max(batches)
    for backend in BACKENDS:
        loaded = {p: _loaders(backend, b, model, threads, max_batch) for p, b in bundles.items()}
        for batch in batches:
            for part in loaded["fp32"][1]:
                if part == "encoder" and model.encoder_flops == 0:
                    continue
                calls = {p: parts[part](batch) for p, (_, parts) in loaded.items()}
                times: dict[str, list[float]] = {p: [] for p in calls}
                den_ms: dict[str, list[float]] = {p: [] for p in calls}
                short = part != "chunk_ddim10"
                for _ in range(rounds):  # alternate precisions: the background load hits both
                    for p, fn in calls.items():
                        t = time_calls(fn, repeats=30 if short else 5, warmup=3 if short else 1,
                                       budget_s=row_seconds / rounds, min_repeats=1)
                        times[p] += t
                        if backend == "cpp":
                            den_ms[p].append(loaded[p][0].last_timing["denoiser_ms"] / 10)
                for p in calls:
                    row = {"backend": backend, "precision": p, "part": part, "batch": batch, **latency_stats(times[p])}
                    if den_ms[p]:
                        row["denoiser_call_ms_from_chunk"] = float(np.median(den_ms[p]))
                    out["rows"].append(row)
                    log(f"[{name}] {backend:<4} {p} {part:<13} batch {batch:>3}: p50 {row['p50_ms']:8.2f} ms")
    out["rows"] += torch_rows(model, batches, threads, row_seconds, torch_compile, log)
    return out


def torch_rows(model: ModelArtifacts, batches: list[int], threads: int, row_seconds: float, compile_: bool,
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    """PyTorch peers (fp32): one denoiser call, eager and (optionally) torch.compile."""
    import torch

    from dpkit.runtime import load_policy

    torch.set_num_threads(threads)
    net = load_policy(model.checkpoint, backend="torch").policy
    rows = []
    variants = [("torch", net.denoiser)]
    if compile_:
        variants.append(("torch.compile", torch.compile(net.denoiser)))
    for label, fn in variants:
        for batch in batches:
            with torch.no_grad():
                cond = net.encoder(*[torch.from_numpy(v) for v in random_obs(model, batch).values()])
                x = torch.randn(batch, model.horizon, model.action_dim)
                t = torch.full((batch,), 50, dtype=torch.int64)

                def call():
                    with torch.no_grad():
                        fn(x, t, cond)
                try:
                    times = time_calls(call, repeats=30, warmup=3, budget_s=row_seconds, min_repeats=3)
                except Exception as e:  # torch.compile needs a C compiler; record, do not fail the run
                    rows.append({"backend": label, "precision": "fp32", "part": "denoiser", "batch": batch,
                                 "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
                    continue
            row = {"backend": label, "precision": "fp32", "part": "denoiser", "batch": batch, **latency_stats(times)}
            rows.append(row)
            log(f"[{model.name}] {label:<4} fp32 denoiser      batch {batch:>3}: p50 {row['p50_ms']:8.2f} ms")
    return rows


def add_limits(result: dict[str, Any]) -> None:
    """Memory-bound limit and share for the batch-1 denoiser rows (ort: the call; cpp: chunk's denoiser / 10)."""
    bw = result["machine"]["mem_gbps"] * 1e9
    for cfg in result["configs"]:
        wb = cfg.get("denoiser_weight_bytes", {})
        for r in cfg["rows"]:
            call_ms = r.get("p50_ms") if r["part"] == "denoiser" else r.get("denoiser_call_ms_from_chunk")
            if r["precision"] in wb and call_ms and r["batch"] == 1:
                limit_ms = wb[r["precision"]] / bw * 1e3
                r["memory_limit_ms"] = limit_ms
                r["memory_share"] = limit_ms / call_ms


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# fp32 vs int8 bundles ({m['date']})", "",
             f"{m['cpu']} ({', '.join(m['cpu_features'])}), {m['cores']} cores, {m['threads']} threads; measured in "
             f"this run: fp32 GEMM {m['gemm_fp32_gflops']} GFLOP/s, memory copy {m['mem_gbps']} GB/s; load average "
             f"{m['load_avg_1m']} at the start, {result.get('load_avg_end')} at the end (a shared machine: "
             "compare fp32 and int8 as ratios within this run). onnxruntime " + str(m.get("onnxruntime")) + ".", "",
             "Random weights. `denoiser`: one call (ort: IOBinding; cpp: the C++ timer's denoiser time of a DDIM-10 "
             "chunk / 10); `chunk`: a whole DDIM-10 chunk (encoder + 10 denoiser calls + loop); memory limit = "
             "denoiser weight bytes / measured copy bandwidth; share = limit / p50.", ""]
    for cfg in result["configs"]:
        lines += [f"## `{cfg['config']}` ({cfg['params'] / 1e6:.1f} M parameters)", ""]
        for s in cfg["skipped"]:
            lines.append(f"- skipped: {s}")
        wb = cfg.get("denoiser_weight_bytes")
        if wb:
            lines.append("- denoiser weights read per call: " + ", ".join(f"{p} {v / 1e6:.1f} MB" for p, v in wb.items()))
        if cfg.get("quantization_error"):
            e = cfg["quantization_error"]["max"]
            lines.append("- int8 vs fp32 graphs (max abs): " + ", ".join(f"{k} {v:.3g}" for k, v in e.items()))
        lines += ["", "| backend | part | batch | fp32 p50 ms | int8 p50 ms | int8 speed-up | fp32 share of memory limit "
                  "| int8 share |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in table_rows(cfg["rows"]):
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """[backend, part, batch, fp32 ms, int8 ms, speed-up, fp32 share, int8 share] per measured row; the C++
    chunk rows add a 'denoiser (C++ timer)' row (the chunk's denoiser time / 10)."""
    by = {(r["backend"], r["part"], r["batch"], r["precision"]): r for r in rows if "p50_ms" in r}
    keys = sorted({k[:3] for k in by}, key=lambda k: (k[2], k[0], k[1]))
    out = []
    for b, part, batch in keys:
        f, q = by.get((b, part, batch, "fp32"), {}), by.get((b, part, batch, "int8"), {})
        views = [(part, "p50_ms", part == "denoiser")]
        if "denoiser_call_ms_from_chunk" in f:
            views.append(("denoiser (C++ timer)", "denoiser_call_ms_from_chunk", True))
        for label, key, share in views:
            fv, qv = f.get(key), q.get(key)
            fs = f"{f['memory_share'] * 100:.0f} %" if share and "memory_share" in f else "–"
            qs = f"{q['memory_share'] * 100:.0f} %" if share and "memory_share" in q else "–"
            out.append([b, label, str(batch), _f(fv), _f(qv), f"{fv / qv:.2f}×" if fv and qv else "–", fs, qs])
    return out


def _f(x: float | None) -> str:
    return "–" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def run(configs: list[str], batches: list[int], threads: int, rounds: int, row_seconds: float, quick: bool,
        torch_compile: bool, cache: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine_info(threads, quick), "batches": batches, "configs": []}
    log(f"machine: GEMM {result['machine']['gemm_fp32_gflops']} GFLOP/s, memory {result['machine']['mem_gbps']} GB/s, "
        f"load {result['machine']['load_avg_1m']}")
    t0 = time.perf_counter()
    for name in configs:
        result["configs"].append(measure_config(name, cache, batches, threads, rounds, row_seconds, torch_compile, log))
    import os

    result["load_avg_end"] = round(os.getloadavg()[0], 2)
    result["seconds"] = time.perf_counter() - t0
    add_limits(result)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpkit.benchmarks.bench_precision", description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 50])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="alternating fp32/int8 rounds per row (default 4)")
    p.add_argument("--row-seconds", type=float, default=8.0, help="time budget per row and precision")
    p.add_argument("--quick", action="store_true", help="smaller machine probes, 2 rounds, 3 s per row")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile (fp32 peer)")
    p.add_argument("--cache", default="benchmarks/.cache")
    p.add_argument("--out", default="benchmarks/results/int8", help="folder for precision.json and precision.md")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if any(b < 1 for b in a.batches):
        raise DpkitError(f"--batches must be positive integers, got {a.batches}")
    rounds, row_s = (2, 3.0) if a.quick else (a.rounds, a.row_seconds)
    result = run(a.configs, sorted(set(a.batches)), a.threads, rounds, row_s, a.quick, a.torch_compile, Path(a.cache))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "precision.json", result)
    atomic_write_text(out / "precision.md", markdown(result))
    print(f"wrote {out / 'precision.json'} and {out / 'precision.md'}")
    return 0


if __name__ == "__main__":
    main()
