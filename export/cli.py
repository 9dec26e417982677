"""`dpkit-export`: a training checkpoint -> a verified ONNX bundle (docs/bundle-format.md).

    dpkit-export runs/tiny --out bundles/tiny                   # run folder: its latest checkpoint, EMA
    dpkit-export runs/tiny/checkpoints/step_003000 --out b --force --no-ema --ddim-steps 5,10,20
    dpkit-export runs/tiny --out bundles/tiny-trt --fp16 --tensorrt --max-batch 64   # GPU machines

The bundle is built in a temp folder beside --out and renamed into place only after ONNX Runtime
reproduced PyTorch within the parity bound; on failure nothing is left behind. Exit codes: 0 ok, 1 bad
input or failed parity, 2 TensorRT requested but unavailable (the ONNX bundle is still written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any, Callable

import dpkit
from dpkit.errors import DpkitError, cli_entry
from dpkit.export.onnx_export import DEFAULT_OPSET, EXPORTER, MIN_OPSET, export_policy
from dpkit.export.schedule import DEFAULT_DDIM_STEPS, build_scheduler, parse_steps
from dpkit.io import atomic_dir, atomic_write_json, check_writable_file
from dpkit.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, read_manifest, sha256_file

DEFAULT_MAX_BATCH = 64


def build_manifest(policy, state: dict[str, Any], paths: dict[str, Path], *, opset: int, ema: bool, fp16: bool,
                   scheduler: dict[str, Any], gemm_conv: bool = True) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    cfg = policy.cfg
    scale, offset = policy.normalizer.unnormalize_affine("action")
    io_names = {"encoder": (list(policy.obs_keys), ["cond"]), "denoiser": (["sample", "timestep", "cond"], ["noise_pred"])}
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
        "models": {
            g: {"file": p.name, "sha256": sha256_file(p), "inputs": io_names[g][0], "outputs": io_names[g][1],
                "dtype": "float16" if fp16 else "float32"}
            for g, p in paths.items()
        },
        "export": {
            "exporter": EXPORTER,
            "opset": opset,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            "dpkit_version": dpkit.__version__,
            "ema": ema,
            "fp16": fp16,
            "conv_lowering": "gemm" if gemm_conv else "conv",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "source": {"checkpoint": str(state.get("checkpoint_path", "")), "step": int(state.get("step", 0))},
        "config": state["config"],
        "parity": {},
    }


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    ema: bool = True,
    fp16: bool = False,
    tensorrt: bool = False,
    opset: int = DEFAULT_OPSET,
    gemm_conv: bool = True,
    ddim_steps=DEFAULT_DDIM_STEPS,
    data: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    json_path: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export, verify and write the bundle; returns a summary (timings, sizes, parity, manifest path).

    Raises DpkitError on bad input or failed parity (no bundle written) and TensorRTUnavailable (exit 2)
    after writing the bundle (and `json_path`) when --tensorrt cannot be honoured.
    """
    from dpkit.export.verify import FP16_TOLERANCE, FP32_TOLERANCE, dataset_samples, format_table, verify_bundle
    from dpkit.train.checkpoint import load_checkpoint

    import onnx

    out = Path(out)
    if json_path:
        check_writable_file(json_path)
    if out.exists() and not force:  # before the slow part; atomic_dir checks again
        raise DpkitError(f"{out} already exists (use --force to replace it)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        # --force replaces bundles, never a mistyped --out such as the training run itself
        raise DpkitError(f"{out} exists and is not a bundle folder (no {MANIFEST}); --force only replaces bundles")
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise DpkitError(f"--opset must be in [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}], got {opset}")
    t0 = time.perf_counter()
    policy, state = load_checkpoint(checkpoint, ema=ema)
    log(f"loaded {state['checkpoint_path']} (step {state['step']}, {'EMA' if ema else 'raw'} weights, "
        f"{policy.cfg.obs_mode}, {policy.num_parameters() / 1e6:.2f} M parameters)")
    scheduler = build_scheduler(policy, ddim_steps)  # also rejects bad --ddim-steps before the slow part
    samples, inputs_desc = dataset_samples(state["config"], data)
    log(f"parity inputs: {inputs_desc}")

    timings: dict[str, float] = {}
    with atomic_dir(out, force=force) as tmp:
        details: dict[str, Any] = {"inputs": inputs_desc}
        passes = [("fp32", False, FP32_TOLERANCE)] + ([("fp16", True, FP16_TOLERANCE)] if fp16 else [])
        for label, half, tol in passes:
            t = time.perf_counter()
            paths = export_policy(policy, tmp, opset, fp16=half, gemm_conv=gemm_conv)
            timings[f"export_{label}_s"] = time.perf_counter() - t
            manifest = build_manifest(policy, state, paths, opset=opset, ema=ema, fp16=half, scheduler=scheduler,
                                      gemm_conv=gemm_conv)
            atomic_write_json(tmp / MANIFEST, manifest)
            t = time.perf_counter()
            rows, parity = verify_bundle(policy, tmp, samples)
            timings[f"verify_{label}_s"] = time.perf_counter() - t
            log(format_table(rows, tol, f"parity ({label} ONNX Runtime CPU vs PyTorch fp32):"))
            details[label] = {"tolerance": tol, "rows": [r.as_dict() for r in rows], "max": parity}
            worst = max(parity.values())
            if not worst <= tol:  # also catches NaN
                raise DpkitError(f"parity check failed: {label} max abs error {worst:.3e} > {tol:g}; "
                                 f"no bundle written to {out}")
        manifest["parity"] = parity  # of the graphs the bundle ships (fp16 ones with --fp16)
        manifest["parity_details"] = details
        atomic_write_json(tmp / MANIFEST, manifest)
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    summary = {
        "bundle": str(out), "checkpoint": state["checkpoint_path"], "obs_mode": policy.cfg.obs_mode,
        "parameters": policy.num_parameters(), "seconds": time.perf_counter() - t0, **timings,
        "sizes_bytes": sizes, "parity": manifest["parity"], "fp16": fp16, "opset": opset,
    }
    log(f"wrote {out} ({', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in sizes.items())}) "
        f"in {summary['seconds']:.1f} s")
    if json_path:
        atomic_write_json(json_path, summary)
    if tensorrt:  # after the bundle and summary are safely written: exit 2 still leaves them valid
        from dpkit.export.tensorrt import build_engines

        manifest = read_manifest(out)
        manifest["tensorrt"] = build_engines(out, manifest, max_batch, fp16)
        atomic_write_json(out / MANIFEST, manifest)
        summary["tensorrt"] = manifest["tensorrt"]
        log(f"TensorRT engines in {out / manifest['tensorrt']['cache_dir']}")
        if json_path:
            atomic_write_json(json_path, summary)
    return summary


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpkit-export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder, or a training run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--fp16", action="store_true",
                   help="ship fp16 graphs (GPU targets; GroupNorm, Mish and normalization stay fp32)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines into BUNDLE/trt_cache")
    p.add_argument("--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH,
                   help=f"TensorRT optimization profile: batch 1..N (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--opset", type=_positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--plain-conv", action="store_true",
                   help="keep the denoiser's Conv/ConvTranspose nodes (default: lowered to one batch-wide GEMM each)")
    p.add_argument("--ddim-steps", type=str, default=",".join(map(str, DEFAULT_DDIM_STEPS)),
                   help="DDIM step counts listed in the bundle (comma-separated; the config's ddim_steps is always added)")
    p.add_argument("--data", default=None, help="dataset for the parity inputs (default: the config's / usual places)")
    p.add_argument("--json", default=None, help="also write a JSON summary (timings, sizes, parity) here")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    export_bundle(
        args.checkpoint, args.out, force=args.force, ema=not args.no_ema, fp16=args.fp16, tensorrt=args.tensorrt,
        opset=args.opset, gemm_conv=not args.plain_conv, ddim_steps=parse_steps(args.ddim_steps), data=args.data,
        max_batch=args.max_batch, json_path=args.json,
    )
    return 0


if __name__ == "__main__":
    main()
