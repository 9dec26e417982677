"""`dpkit-export`: a training checkpoint -> a verified ONNX bundle (docs/bundle-format.md).

    dpkit-export runs/tiny --out bundles/tiny                   # run folder: its latest checkpoint, EMA
    dpkit-export runs/tiny/checkpoints/step_003000 --out b --force --no-ema --ddim-steps 5,10,20
    dpkit-export runs/tiny --out bundles/tiny-trt --fp16 --tensorrt --max-batch 64   # GPU machines
    dpkit-export runs/tiny --out bundles/tiny-int8 --precision int8                  # int8 weights, CPUs

The bundle is built in a temp folder beside --out and renamed into place only after ONNX Runtime
reproduced PyTorch within the parity bound; on failure nothing is left behind. The work is done by the
library module dpkit.export.writer (`export_bundle`); this is its command line. Exit codes: 0 ok, 1 bad
input or failed parity, 2 TensorRT requested but unavailable (the ONNX bundle is still written).
"""

from __future__ import annotations

import argparse

from dpkit.cli_args import add_common_args, apply_threads
from dpkit.errors import cli_entry
from dpkit.export.onnx_export import DEFAULT_OPSET
from dpkit.export.schedule import DEFAULT_DDIM_STEPS, parse_steps
from dpkit.export.writer import DEFAULT_MAX_BATCH, build_manifest, export_bundle  # noqa: F401 (re-exported)


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
    p.add_argument("--precision", default=None, metavar="fp32|fp16|int8",
                   help="weights of the shipped graphs (default fp32): fp16 for GPUs (same as --fp16); int8: the "
                        "denoiser's matrix products with int8 weights for CPUs (dynamic quantization, checked "
                        "against the fp32 graphs)")
    p.add_argument("--fp16", action="store_true",
                   help="ship fp16 graphs (GPU targets; GroupNorm, Mish and normalization stay fp32); = --precision fp16")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines into BUNDLE/trt_cache")
    p.add_argument("--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH,
                   help=f"TensorRT optimization profile written into policy.json: batch 1..N (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--opt-batch", type=_positive_int, default=None,
                   help="TensorRT profile batch to optimize for (default min(8, --max-batch))")
    p.add_argument("--opset", type=_positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--plain-conv", action="store_true",
                   help="keep the denoiser's Conv/ConvTranspose nodes (default: lowered to one batch-wide GEMM each)")
    p.add_argument("--ddim-steps", type=str, default=",".join(map(str, DEFAULT_DDIM_STEPS)),
                   help="the DDIM denoising step counts K listed in the bundle, each a sampler ddim-K "
                        "(comma-separated; the config's ddim_steps is always added)")
    p.add_argument("--data", default=None, help="dataset for the parity inputs (default: the config's / usual places)")
    # --no-progress too, so one command line style works for every dpkit-* (the export prints a line per stage)
    add_common_args(p, json="also write a summary (timings, sizes, parity, threads) here")  # --threads,
    # --no-progress, --json PATH, --version
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    apply_threads(args)
    export_bundle(
        args.checkpoint, args.out, force=args.force, ema=not args.no_ema, fp16=args.fp16, precision=args.precision,
        tensorrt=args.tensorrt,
        opset=args.opset, gemm_conv=not args.plain_conv, ddim_steps=parse_steps(args.ddim_steps), data=args.data,
        max_batch=args.max_batch, opt_batch=args.opt_batch, json_path=args.json, threads=args.threads,
    )
    return 0


if __name__ == "__main__":
    main()
