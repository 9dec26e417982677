"""int8 weights for the denoiser's matrix products (`dpkit-export --precision int8`), and the error check.

    from dpkit.export.quantize import quantize_denoiser, measure_int8_error
    block = quantize_denoiser(Path("fp32/denoiser.onnx"), Path("int8/denoiser.onnx"))   # -> models.denoiser.quantization
    rows, worst = measure_int8_error(fp32_bundle, int8_bundle, samples, policy)          # vs the fp32 graphs

Why int8, and why these choices (measured on the 2-core AMD EPYC VM, README "int8"):
- At batch 1 the denoiser is memory-bound: each call streams every weight once (263 MB fp32 for the
  65.8 M low-dim U-Net). int8 weights read a quarter of the bytes.
- ONNX Runtime *dynamic* quantization: weights int8 (symmetric), activations uint8 quantized per call by
  DynamicQuantizeLinear from their own range, so no calibration data is needed and the quantized ranges
  follow each call's inputs (they change with the timestep). ORT runs MatMulInteger on VNNI/AVX-512.
- The exporter lowers every denoiser convolution to one batch-wide MatMul (export/fast_conv.py), so the
  op types quantized are MatMul and Gemm (ORT rewrites Gemm as MatMul + Add first): that covers the U-Net's
  convolutions and the FiLM conditioning layers. GroupNorm, Mish, the sinusoidal step encoding and every
  elementwise op stay float (they are not matrix products).
- Layers kept float (FLOAT_LAYERS): the step-embedding MLP and the first and last layers. They hold a
  small share of the bytes and they touch the raw noisy sample and write the predicted noise directly,
  so their rounding is not averaged out by later layers.
- 7-bit weights (REDUCE_RANGE = True): the graph must give the same result on every x86 CPU, not only
  on the one that exported it. Without VNNI, ORT's u8 x s8 kernel multiplies with VPMADDUBSW, whose
  pairwise int16 sums saturate for full-range int8 weights; with weights in [-64, 63] no pair can
  (255 * 64 * 2 < 32767). Measured on the test suite's random-weight `tiny` denoiser (batch 8, one call,
  max abs error vs fp32): full range 0.039 on AVX-512 VNNI but 0.659 on the AVX2 path (the same graph
  under valgrind, which hides AVX-512); reduced range 0.042 on both, bit for bit the same output.
- Per-tensor weight scales (PER_CHANNEL = False): per-channel scales measured no better on a trained
  `tiny` policy (DDIM-10 trajectory error 5.18e-3 vs 5.23e-3, DDPM-100 5.9e-3 vs 5.4e-3), and keeping
  FLOAT_LAYERS float halved the error (1.1e-2 -> 5.2e-3 with every layer int8).

The bundle's error against its own fp32 graphs (which the exporter has already matched to PyTorch within
1e-4) is measured per denoiser call and over whole DDIM and DDPM trajectories with the same injected noise,
and a bundle above INT8_BOUNDS is refused (docs/bundle-format.md, "Precision").
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.errors import DpkitError
from dpkit.runtime.bundle import PRECISIONS
QUANT_METHOD = "dynamic"
OP_TYPES = ("MatMul", "Gemm")
PER_CHANNEL = False
REDUCE_RANGE = True
# Weight-name prefixes (the PyTorch parameter names the exporter keeps as initializer names) of the
# denoiser layers that stay float: the step embedding, the first layer (block1 and residual of the first
# down block read the raw noisy sample) and the last layers (final conv block and 1x1 projection).
FLOAT_LAYERS = ("denoiser.unet.step_encoder.", "denoiser.unet.down.0.0.block1.", "denoiser.unet.down.0.0.residual.",
                "denoiser.unet.final.")

# Refusal bounds of an int8 bundle against its fp32 graphs (max abs error). The predicted noise is ~N(0, 1)
# per entry; trajectories are normalized actions in [-1, 1] (1.0 = half the action range, 256 px in PushT).
# Measured (README "int8"; per-tensor weights, FLOAT_LAYERS kept float): one denoiser call 0.02-0.07 for
# trained and random-weight models alike, so 0.2 leaves a 3x margin and still catches a mis-scaled layer
# (errors of order 1). Trajectories: 5e-3-1.3e-2 for trained `tiny` policies (1-3 px), but 0.03-0.14 for
# random-weight models (benchmarks, tests), whose DDIM steps amplify each call's error instead of
# contracting it; 0.5 (a quarter of the clip range) refuses a trajectory that went somewhere else, not
# rounding. The real check of rounding is the task score (README "int8").
INT8_BOUNDS = {"denoiser": 0.2, "traj_ddim": 0.5, "traj_ddpm": 0.5, "traj_fewstep": 0.5}
ERROR_BATCHES = (1, 8)
TRAJ_BATCH = 8


def parse_precision(precision: str | None, fp16: bool = False) -> str:
    """The export precision from `--precision` and the older `--fp16` flag (which means `--precision fp16`)."""
    if precision is None:
        return "fp16" if fp16 else "fp32"
    if precision not in PRECISIONS:
        raise DpkitError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if fp16 and precision != "fp16":
        raise DpkitError(f"--fp16 contradicts --precision {precision} (--fp16 means --precision fp16)")
    return precision


@contextmanager
def _quiet_root_logger():
    # onnxruntime.quantization logs a "consider pre-processing" warning on the root logger for every call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _weight_of(node, inits: set[str]) -> str | None:
    """The initializer a MatMul/Gemm node multiplies by (its second input), or None."""
    return node.input[1] if len(node.input) > 1 and node.input[1] in inits else None


def quantize_denoiser(src: Path, dst: Path, per_channel: bool | None = None,
                      float_layers: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Write the int8 version of the fp32 graph `src` to `dst`; returns the manifest's `quantization` block.
    Defaults: PER_CHANNEL and FLOAT_LAYERS.

    Raises DpkitError when a FLOAT_LAYERS prefix matches no weight (the exporter's names changed) or
    nothing was quantized.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    per_channel = PER_CHANNEL if per_channel is None else per_channel
    float_layers = FLOAT_LAYERS if float_layers is None else tuple(float_layers)
    model = onnx.load(str(src), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    candidates = [(n.name, _weight_of(n, inits)) for n in model.graph.node if n.op_type in OP_TYPES]
    candidates = [(n, w) for n, w in candidates if w is not None]
    keep = [n for n, w in candidates if w.startswith(float_layers)]
    for prefix in float_layers:
        if not any(w.startswith(prefix) for _, w in candidates):
            raise DpkitError(f"int8 export: no {'/'.join(OP_TYPES)} weight of {src.name} starts with {prefix!r} "
                             "(the layers to keep float were not found)")
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    del model
    with _quiet_root_logger():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(OP_TYPES), per_channel=per_channel,
                         reduce_range=REDUCE_RANGE, weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                         use_external_data_format=external)
    q = onnx.load(str(dst), load_external_data=False)
    integer_ops = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
    n_int = sum(1 for n in q.graph.node if n.op_type in integer_ops)
    if n_int == 0:
        raise DpkitError(f"int8 export: ONNX Runtime quantized no node of {src.name}")
    n_float = sum(1 for n in q.graph.node if n.op_type in ("MatMul", "Gemm"))
    return {
        "method": QUANT_METHOD,
        "weight_type": "int8",
        "activation_type": "uint8",
        "per_channel": bool(per_channel),
        "reduce_range": REDUCE_RANGE,
        "op_types": list(OP_TYPES),
        "nodes_quantized": n_int,
        "nodes_float": n_float,
        "float_layers": list(float_layers),
        "onnxruntime_version": onnxruntime.__version__,
    }


def weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers (what one call reads from memory at least once)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))  # external data (if any) from beside the file
    return int(sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer))


def measure_int8_error(fp32_bundle: Path, int8_bundle: Path, policy, samples: dict | None,
                       seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Rows and per-check max abs error of the int8 bundle against the fp32 graphs: each denoiser call on
    the parity inputs (dataset windows when given, random ones always) at batch 1 and 8, and whole DDIM
    (the bundle's default K) and DDPM trajectories at batch TRAJ_BATCH with the same injected noise."""
    from dpkit.export.verify import _graph_inputs
    from dpkit.runtime.ort_policy import OrtPolicy
    from dpkit.runtime.parity import max_abs_error, random_observations, trajectory_errors

    ref = OrtPolicy(fp32_bundle, spin=False)
    q = OrtPolicy(int8_bundle, spin=False)
    rows: list[dict[str, Any]] = []
    for batch in ERROR_BATCHES:
        for kind, graphs in _graph_inputs(policy, samples, batch, seed + batch).items():
            for name, a, b, out in (("encoder", ref.encoder, q.encoder, "cond"),
                                    ("denoiser", ref.denoiser, q.denoiser, "noise_pred")):
                feed = graphs[name]
                err = max_abs_error(b.run([out], feed)[0], a.run([out], feed)[0])
                rows.append({"check": name, "inputs": kind, "batch": batch, "max_abs_err": err})
    if samples is not None:
        idx = np.arange(TRAJ_BATCH) % len(next(iter(samples["obs"].values())))
        obs, kind = {k: np.asarray(v, np.float32)[idx] for k, v in samples["obs"].items()}, "dataset"
    else:
        obs, kind = random_observations(ref.observations, ref.n_obs_steps, TRAJ_BATCH, seed), "random"
    for check, spec in ref.bundle.schedule.trajectory_checks():
        steps = spec.num_inference_steps
        err = trajectory_errors(ref, {"int8": q}, obs, spec.sampler, steps, seed)["int8"]
        rows.append({"check": check, "inputs": kind, "batch": TRAJ_BATCH, "max_abs_err": err, "steps": steps})
    worst: dict[str, float] = {}
    for r in rows:
        worst[r["check"]] = max(worst.get(r["check"], 0.0), r["max_abs_err"])
    return rows, worst


def check_int8_error(worst: dict[str, float], bounds: dict[str, float], out: Path) -> None:
    """Raise DpkitError naming the first check above its bound (NaN fails too); nothing is written. Every
    measured trajectory check must have a bound; the denoiser's must have been measured (trajectories: the sampler kinds
    the bundle has, Schedule.trajectory_checks)."""
    for check in worst:
        if check.startswith("traj_") and check not in bounds:
            raise DpkitError(f"int8 error check {check!r} has no bound; no bundle written to {out}")
    for check, bound in bounds.items():
        if check.startswith("traj_") and check not in worst:
            continue
        err = worst.get(check, float("inf"))
        if not err <= bound:
            raise DpkitError(f"int8 error check failed: {check} max abs error vs the fp32 graphs {err:.3e} > "
                             f"bound {bound:g}; no bundle written to {out}")
