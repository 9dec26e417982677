"""The bundle writer: a DiffusionPolicy (in memory or from a checkpoint) -> a verified bundle folder.

    from dpkit.export.writer import export_bundle, write_bundle
    export_bundle("runs/tiny", "bundles/tiny", ddim_steps=(10,))              # what dpkit-export runs
    write_bundle(policy, "bundles/x", config=cfg.to_dict(), source={...})     # a policy already in memory

The one writer of policy.json (`build_manifest`); `dpkit-export` (cli.py), the benchmarks and the tests
(cpp/tests/make_test_bundle.py, tests/data/golden/make_golden.py) all write bundles through it. The
bundle is built in a temp folder beside `out` and renamed into place only after ONNX Runtime reproduced
PyTorch within the parity bound and the one bundle reader (cpp/src/manifest.cpp, through
dpkit.runtime.bundle.load_bundle) accepted the finished folder; on failure nothing is left behind.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import dpkit
from dpkit.errors import DpkitError
from dpkit.export.onnx_export import DEFAULT_OPSET, EXPORTER, MIN_OPSET, export_policy
from dpkit.export.schedule import DEFAULT_DDIM_STEPS, build_scheduler
from dpkit.io import atomic_dir, atomic_write_json, check_writable_file, folder_lock, sha256_file
from dpkit.runtime.bundle import (FORMAT, FORMAT_VERSION, MANIFEST, TRT_CACHE_DIR, limits, load_bundle, onnx_info,
                                  read_manifest)
from dpkit.threads import apply_torch, choose_threads, describe

# TensorRT optimization profile written into every manifest (`tensorrt`): batch 1..max_batch, tuned for
# opt_batch. The opt batch is min(DEFAULT_OPT_BATCH, max_batch) unless given.
DEFAULT_MAX_BATCH = 64
DEFAULT_OPT_BATCH = 8


def trt_profile(max_batch: int, opt_batch: int | None, fp16: bool) -> dict[str, Any]:
    """The manifest's `tensorrt` entry before any engine is built (`engines: false`)."""
    top = limits()["max_trt_batch"]  # the reader's bound
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= top:
        raise DpkitError(f"--max-batch must be an integer in [1, {top}], got {max_batch!r}")
    opt = min(DEFAULT_OPT_BATCH, max_batch) if opt_batch is None else opt_batch
    if isinstance(opt, bool) or not isinstance(opt, int) or not 1 <= opt <= max_batch:
        raise DpkitError(f"--opt-batch must be an integer in [1, --max-batch = {max_batch}], got {opt!r}")
    return {"cache_dir": TRT_CACHE_DIR, "min_batch": 1, "opt_batch": opt, "max_batch": max_batch,
            "precision": "fp16" if fp16 else "fp32", "engines": False}


def _external_data(graph: Path) -> list[dict[str, str]]:
    """The `external_data` entries of a graph just written: every file its tensors reference, hashed."""
    refs = sorted(onnx_info(graph)["external"])
    return [{"file": f, "sha256": sha256_file(graph.parent / f)} for f in refs]


def build_manifest(policy, config: dict[str, Any], source: dict[str, Any], paths: dict[str, Path], *,
                   opset: int, ema: bool, fp16: bool, scheduler: dict[str, Any], tensorrt: dict[str, Any],
                   gemm_conv: bool = True, quantization: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """policy.json for the graphs at `paths` (docs/bundle-format.md); `parity` is filled in later.
    `quantization`: per graph, the block dpkit.export.quantize.quantize_denoiser returned (int8 graphs)."""
    import onnx
    import onnxruntime
    import torch

    cfg = policy.cfg
    scale, offset = policy.normalizer.unnormalize_affine("action")
    io_names = {"encoder": (list(policy.obs_keys), ["cond"]), "denoiser": (["sample", "timestep", "cond"], ["noise_pred"])}
    models = {}
    for g, p in paths.items():
        models[g] = {"file": p.name, "sha256": sha256_file(p), "inputs": io_names[g][0], "outputs": io_names[g][1],
                     "dtype": "float16" if fp16 else "float32"}
        models[g]["precision"] = "int8" if (quantization or {}).get(g) else ("fp16" if fp16 else "fp32")
        if models[g]["precision"] == "int8":
            models[g]["quantization"] = quantization[g]
        ext = _external_data(p)
        if ext:
            models[g]["external_data"] = ext
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "obs_mode": cfg.obs_mode,
        "n_obs_steps": cfg.n_obs_steps,
        "horizon": cfg.horizon,
        "n_action_steps": cfg.n_action_steps,
        "action_dim": cfg.action_dim,
        "first_action_index": cfg.first_action_index,
        "cond_dim": int(policy.cond_dim),
        "observations": policy.observation_spec(),
        "action_normalizer": {"scale": [float(v) for v in scale], "offset": [float(v) for v in offset]},
        "scheduler": scheduler,
        "models": models,
        "tensorrt": tensorrt,
        "export": {
            "exporter": EXPORTER,
            "opset": opset,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            "dpkit_version": dpkit.__version__,
            "ema": ema,
            "fp16": fp16,
            "precision": models["denoiser"]["precision"],
            "conv_lowering": "gemm" if gemm_conv else "conv",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "source": source,
        "config": config,
        "parity": {},
    }


def _externalize(graph: Path) -> None:
    """Re-save `graph` with its weights in `<name>.data` beside it (what the exporter does on its own
    above the 2 GB protobuf limit); lets small bundles exercise the external-data rules."""
    import onnx

    model = onnx.load(str(graph))
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{graph.name}.data", size_threshold=1024)


def check_out(out: Path, force: bool) -> None:
    """Refuse `out` before any slow work: it exists without --force, or is not a bundle folder."""
    if out.exists() and not force:  # atomic_dir checks again
        raise DpkitError(f"{out} already exists (use --force to replace it)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        # --force replaces bundles, never a mistyped --out such as the training run itself
        raise DpkitError(f"{out} exists and is not a bundle folder (no {MANIFEST}); --force only replaces bundles")


def _quantize_int8(policy, tmp: Path, out: Path, config, source, samples, details: dict[str, Any],
                   log: Callable[[str], None], **manifest_args) -> tuple[dict[str, Any], dict[str, float]]:
    """Turn the verified fp32 bundle in `tmp` into the int8 one (denoiser quantized, encoder unchanged),
    measure it against the fp32 graphs (kept in a sibling temp folder until then) and refuse it above
    INT8_BOUNDS. Returns (manifest, per-check max error)."""
    import shutil
    import tempfile

    from dpkit.export.quantize import INT8_BOUNDS, check_int8_error, measure_int8_error, quantize_denoiser

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=tmp.parent) as ref_dir:
        ref = Path(ref_dir)
        for f in tmp.iterdir():
            shutil.move(str(f), str(ref / f.name))
        encoder = ref / read_manifest(ref)["models"]["encoder"]["file"]
        for f in ref.iterdir():  # the encoder graph (and its data file) ships unchanged
            if f.name == encoder.name or f.name.startswith(encoder.name + "."):
                shutil.copy2(f, tmp / f.name)
        block = quantize_denoiser(ref / "denoiser.onnx", tmp / "denoiser.onnx")
        paths = {"encoder": tmp / encoder.name, "denoiser": tmp / "denoiser.onnx"}
        manifest = build_manifest(policy, config, source, paths, fp16=False, quantization={"denoiser": block},
                                  **manifest_args)
        atomic_write_json(tmp / MANIFEST, manifest)
        load_bundle(tmp)  # the runtime's reader accepts what this writer wrote
        rows, worst = measure_int8_error(ref, tmp, policy, samples)
    lines = ["int8 error (ONNX Runtime int8 graphs vs the fp32 graphs, same inputs and injected noise):",
             f"  {'check':<10} {'inputs':<8} {'batch':>5}  {'max abs err':>11}  bound"]
    for r in rows:
        bound = INT8_BOUNDS.get(r["check"])
        flag = "  FAIL" if bound is not None and not r["max_abs_err"] <= bound else ""
        lines.append(f"  {r['check']:<10} {r['inputs']:<8} {r['batch']:>5}  {r['max_abs_err']:>11.3e}  "
                     f"{'-' if bound is None else f'{bound:g}'}{flag}")
    log("\n".join(lines + [f"  quantized {block['nodes_quantized']} MatMul/Gemm nodes, {block['nodes_float']} kept float"]))
    check_int8_error(worst, INT8_BOUNDS, out)
    details["int8"] = {"reference": "fp32 ONNX graphs", "bounds": dict(INT8_BOUNDS), "rows": rows, "max": worst}
    manifest["export"]["quantization_error"] = {"reference": "fp32 ONNX graphs", "bounds": dict(INT8_BOUNDS),
                                                "max": worst}
    return manifest, worst


def write_bundle(
    policy,
    out: str | Path,
    *,
    config: dict[str, Any],
    source: dict[str, Any],
    force: bool = False,
    ema: bool = True,
    fp16: bool = False,
    precision: str | None = None,
    opset: int = DEFAULT_OPSET,
    gemm_conv: bool = True,
    ddim_steps: Iterable[int] = DEFAULT_DDIM_STEPS,
    ddpm_steps: Iterable[int] = (),
    samples: dict | None = None,
    inputs_desc: str = "random inputs only (no dataset given)",
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    external_data: bool = False,
    parity_tolerance: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export `policy` (a DiffusionPolicy in eval mode), verify it and write the bundle to `out`.

    `config`: the resolved training config copied into the manifest; `source`: {"checkpoint", "step"};
    `samples`: dataset windows for the parity check (dpkit.export.verify.dataset_samples), else random
    inputs only; `ddpm_steps`: DDPM step counts listed besides num_train_timesteps; `external_data`:
    store the weights in `<graph>.onnx.data` files (listed and hashed in the manifest); `precision`:
    "fp32" (default), "fp16" (same as `fp16=True`) or "int8" (dpkit.export.quantize: the fp32 graphs are
    exported and verified first, then the denoiser's matrix products get int8 weights and the error
    against the fp32 graphs must stay within INT8_BOUNDS); `parity_tolerance`: the fp32 bound of the
    ONNX-vs-PyTorch check (default FP32_TOLERANCE, 1e-4). Only the peer sweeps' tests raise it: their random
    networks amplify float32 rounding along a DDIM trajectory ~100x (2.5e-6 per call, 2e-4 after ten steps,
    with PyTorch's AVX2 kernels), and they hold the bundle to the peer's float64 run instead. Returns a
    summary (timings, sizes, parity).
    Raises DpkitError on bad input or failed parity (nothing written).
    """
    import onnx

    from dpkit.export.quantize import parse_precision
    from dpkit.export.verify import FP16_TOLERANCE, FP32_TOLERANCE, format_table, verify_bundle

    out = Path(out)
    precision = parse_precision(precision, fp16)
    fp16 = precision == "fp16"
    check_out(out, force)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise DpkitError(f"--opset must be in [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}], got {opset}")
    tensorrt = trt_profile(max_batch, opt_batch, fp16)
    scheduler = build_scheduler(policy, ddim_steps, ddpm_steps)  # also rejects bad step counts early
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with atomic_dir(out, force=force) as tmp:
        details: dict[str, Any] = {"inputs": inputs_desc}
        passes = [("fp32", False, parity_tolerance or FP32_TOLERANCE)]
        passes += [("fp16", True, FP16_TOLERANCE)] if fp16 else []
        for label, half, tol in passes:
            t = time.perf_counter()
            for old in tmp.iterdir():  # the fp16 pass replaces the fp32 graphs (and their data files)
                old.unlink()
            paths = export_policy(policy, tmp, opset, fp16=half, gemm_conv=gemm_conv)
            if external_data:
                for p in paths.values():
                    _externalize(p)
            timings[f"export_{label}_s"] = time.perf_counter() - t
            manifest = build_manifest(policy, config, source, paths, opset=opset, ema=ema, fp16=half,
                                      scheduler=scheduler, tensorrt=tensorrt, gemm_conv=gemm_conv)
            atomic_write_json(tmp / MANIFEST, manifest)
            load_bundle(tmp)  # the runtime's reader accepts what this writer wrote
            t = time.perf_counter()
            rows, parity = verify_bundle(policy, tmp, samples)
            timings[f"verify_{label}_s"] = time.perf_counter() - t
            log(format_table(rows, tol, f"parity ({label} ONNX Runtime CPU vs PyTorch fp32):"))
            details[label] = {"tolerance": tol, "rows": [r.as_dict() for r in rows], "max": parity}
            worst = max(parity.values())
            if not worst <= tol:  # also catches NaN
                raise DpkitError(f"parity check failed: {label} max abs error {worst:.3e} > {tol:g}; "
                                 f"no bundle written to {out}")
        if precision == "int8":
            t = time.perf_counter()
            manifest, parity = _quantize_int8(policy, tmp, out, config, source, samples, details, log,
                                              opset=opset, ema=ema, scheduler=scheduler, tensorrt=tensorrt,
                                              gemm_conv=gemm_conv)
            timings["int8_s"] = time.perf_counter() - t
        manifest["parity"] = parity  # of the graphs the bundle ships (fp16 ones with --fp16; int8: vs fp32 graphs)
        manifest["parity_details"] = details
        atomic_write_json(tmp / MANIFEST, manifest)
        # The finished folder, as it will be renamed into place, passes the one reader (every manifest and file
        # rule; the graphs' sha256 were checked by the reader after they were written, above, and are unchanged).
        load_bundle(tmp, verify_sha256=False)
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    summary = {
        "bundle": str(out), "checkpoint": source.get("checkpoint", ""), "obs_mode": policy.cfg.obs_mode,
        "parameters": policy.num_parameters(), "seconds": time.perf_counter() - t0, **timings,
        "sizes_bytes": sizes, "parity": manifest["parity"], "fp16": fp16, "precision": precision, "opset": opset,
    }
    if "quantization_error" in manifest["export"]:
        summary["quantization_error"] = manifest["export"]["quantization_error"]
    log(f"wrote {out} ({', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in sizes.items())}) "
        f"in {summary['seconds']:.1f} s")
    return summary


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    ema: bool = True,
    fp16: bool = False,
    precision: str | None = None,
    tensorrt: bool = False,
    opset: int = DEFAULT_OPSET,
    gemm_conv: bool = True,
    ddim_steps: Iterable[int] = DEFAULT_DDIM_STEPS,
    ddpm_steps: Iterable[int] = (),
    data: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    json_path: str | Path | None = None,
    log: Callable[[str], None] = print,
    threads: int | None = None,
    parity_tolerance: float | None = None,
) -> dict[str, Any]:
    """Load a checkpoint, then write_bundle; returns the summary (timings, sizes, parity, ...).

    `threads`: torch's intra-op threads (None or 0: dpkit.threads' choice for the model's size; the ONNX
    Runtime sessions of the parity checks make the same choice, or take $DPKIT_THREADS, which
    `dpkit-export --threads` sets); the summary's "threads" records it.

    Raises DpkitError on bad input or failed parity (no bundle written) and TensorRTUnavailable (exit 2)
    after writing the bundle (and `json_path`) when `tensorrt` cannot be honoured.
    """
    from dpkit.export.quantize import parse_precision
    from dpkit.export.verify import dataset_samples
    from dpkit.train.checkpoint import load_checkpoint

    out = Path(out)
    precision = parse_precision(precision, fp16)
    fp16 = precision == "fp16"
    if tensorrt and precision == "int8":
        raise DpkitError("--precision int8 is for CPUs (ONNX Runtime's integer MatMul kernels); TensorRT engines "
                         "are built from fp32 or fp16 bundles")
    if json_path:
        check_writable_file(json_path)
    check_out(out, force)  # before the slow part
    trt_profile(max_batch, opt_batch, fp16)
    with folder_lock(out, "bundle folder"):  # one writer at a time, from here to the publish
        check_out(out, force)  # again, now that no other writer can change it
        t0 = time.perf_counter()
        policy, state = load_checkpoint(checkpoint, ema=ema)
        log(f"loaded {state['checkpoint_path']} (step {state['step']}, {'EMA' if ema else 'raw'} weights, "
            f"{policy.cfg.obs_mode}, {policy.num_parameters() / 1e6:.2f} M parameters)")
        thread_choice = choose_threads(threads, params=policy.num_parameters())
        apply_torch(thread_choice)
        log(f"threads: {describe(thread_choice)}")
        build_scheduler(policy, ddim_steps, ddpm_steps)  # rejects bad step counts before loading the data
        samples, inputs_desc = dataset_samples(state["config"], data)
        log(f"parity inputs: {inputs_desc}")
        source = {"checkpoint": str(state.get("checkpoint_path", "")), "step": int(state.get("step", 0))}
        if isinstance(state.get("source"), dict):  # a run written by dpkit-convert: where the policy came from
            source["converted_from"] = state["source"]
        summary = write_bundle(policy, out, config=state["config"], source=source, force=force, ema=ema,
                               fp16=fp16, precision=precision, opset=opset, gemm_conv=gemm_conv,
                               ddim_steps=ddim_steps, ddpm_steps=ddpm_steps, samples=samples,
                               inputs_desc=inputs_desc, max_batch=max_batch, opt_batch=opt_batch,
                               parity_tolerance=parity_tolerance, log=log)
        summary["checkpoint"] = state["checkpoint_path"]
        summary["threads"] = thread_choice.to_json()
        summary["seconds"] = time.perf_counter() - t0
        if json_path:
            atomic_write_json(json_path, summary)
        if tensorrt:  # after the bundle and summary are safely written: exit 2 still leaves them valid
            from dpkit.export.tensorrt import build_engines

            manifest = read_manifest(out)
            manifest["tensorrt"] = build_engines(out, manifest)
            atomic_write_json(out / MANIFEST, manifest)
            summary["tensorrt"] = manifest["tensorrt"]
            log(f"TensorRT engines in {out / manifest['tensorrt']['cache_dir']}")
            if json_path:
                atomic_write_json(json_path, summary)
        return summary
