"""PyTorch -> ONNX for the two halves of a DiffusionPolicy: `encoder.onnx` and `denoiser.onnx`.

    from dpkit.export.onnx_export import export_encoder, export_denoiser
    export_encoder(policy, "bundle/encoder.onnx", opset=20)

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript), batch dimension dynamic.

Why opset 20 by default: at opset <= 20 the exporter writes the denoiser's GroupNorm as Reshape -> InstanceNormalization
-> Reshape -> Mul -> Add, the pattern TensorRT's ONNX parser has handled (and fuses into its GroupNorm
kernel) since TensorRT 8.6, and that every ONNX Runtime provider runs. Opset 21 emits the native
GroupNormalization op instead, whose opset-21 semantics (per-channel scale/bias) older TensorRT parsers
and some ORT providers do not take. Mish is written in the model as x * tanh(softplus(x)) (Softplus,
Tanh, Mul: supported everywhere) rather than the Mish op. 18 is the exporter's minimum. The encoder's
GroupNorms are written as plain reductions at every opset (exact_norm.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpkit.errors import DpkitError
from dpkit.export.exact_norm import exact_group_norms
from dpkit.export.fast_conv import GemmConv1d, GemmConvTranspose1d, batch_gemm_convs
from dpkit.train.policy import named_forward

DEFAULT_OPSET = 20
MIN_OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"
# A protobuf cannot exceed 2 GiB; above ~1.8 GB of weights they go to an external-data file instead.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Layers whose weights and arithmetic --fp16 converts; everything else (GroupNorm, Mish, observation
# normalization, the sinusoidal step embedding) stays fp32. These hold nearly all FLOPs, and keeping
# normalization statistics and the step frequencies (t * f up to ~100 rad) in fp32 avoids fp16 rounding
# where it hurts.
HALF_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.Linear, GemmConv1d, GemmConvTranspose1d)


class _EncoderGraph(nn.Module):
    """The encoder with one named input per observation (the bundle's observation names, in order)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_EncoderGraph":
        if cls is _EncoderGraph and args:
            cls = named_forward(_EncoderGraph, args[0].obs_keys)
        return super().__new__(cls)

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, *observations: Tensor) -> Tensor:
        return self.encoder(*observations).float()


class _DenoiserGraph(nn.Module):
    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, sample: Tensor, timestep: Tensor, cond: Tensor) -> Tensor:
        return self.denoiser(sample, timestep, cond).float()


def half_heavy_layers(module: nn.Module) -> nn.Module:
    """In place: HALF_LAYERS run in fp16 (weights and inputs cast), their outputs cast back to fp32."""
    for m in module.modules():
        if isinstance(m, HALF_LAYERS):
            m.half()
            m.register_forward_pre_hook(lambda _m, args: tuple(a.half() for a in args))
            m.register_forward_hook(lambda _m, _args, out: out.float())
    return module


def graph_modules(policy, fp16: bool = False, gemm_conv: bool = True) -> dict[str, nn.Module]:
    """The two exportable modules (fresh copies, eval mode; fp16 ones converted by half_heavy_layers).

    gemm_conv: the denoiser's 1D convolutions are exported as one batch-wide MatMul each (fast_conv.py)
    instead of Conv nodes, whose ONNX Runtime CPU kernel runs one GEMM per batch sample. One denoiser
    call, ORT CPU 2 threads, Conv graph -> GEMM graph: pusht_lowdim batch 1 / 4 / 50: 17.9 -> 12.2,
    66 -> 28, 842 -> 270 ms (torch eager: 49, 46, 185 ms); tiny: 2.3 -> 2.3, 5.9 -> 4.3, 65 -> 31 ms.
    Same numbers to ~1e-6. False exports plain Conv/ConvTranspose nodes.

    The encoder's GroupNorms are exported in two-level form (exact_norm.py): ONNX Runtime's fused
    InstanceNormalization sums a ResNet group's thousands of values sequentially in float32.
    """
    import copy

    enc, den = copy.deepcopy(policy.encoder).eval(), copy.deepcopy(policy.denoiser).eval()
    exact_group_norms(enc)
    if gemm_conv:
        batch_gemm_convs(den)
    if fp16:
        half_heavy_layers(enc)
        half_heavy_layers(den)
    return {"encoder": _EncoderGraph(enc).eval(), "denoiser": _DenoiserGraph(den).eval()}


def example_inputs(policy, batch: int = 2, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """Plausible example inputs of both graphs (batch 2: a batch of 1 could be specialized as static)."""
    g = torch.Generator().manual_seed(seed)
    cfg = policy.cfg
    obs = {}
    for o in policy.observation_spec():
        shape = (batch, cfg.n_obs_steps, *o["shape"])
        obs[o["name"]] = torch.rand(shape, generator=g) * (1.0 if o["name"] == "image" else 512.0)
    den = {
        "sample": torch.randn(batch, cfg.horizon, cfg.action_dim, generator=g),
        "timestep": torch.randint(0, cfg.num_train_timesteps, (batch,), generator=g),
        "cond": torch.randn(batch, policy.cond_dim, generator=g),
    }
    return {"encoder": obs, "denoiser": den}


def export_graph(module: nn.Module, inputs: dict[str, Tensor], output: str, path: Path, opset: int) -> None:
    """Export `module(**inputs)` to `path` with every input's dim 0 dynamic ("batch")."""
    if opset < MIN_OPSET:
        raise DpkitError(f"--opset {opset} is below {MIN_OPSET}, the dynamo exporter's minimum")
    batch = torch.export.Dim("batch", min=1, max=65536)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    n_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    quiet = logging.getLogger("torch.onnx")
    old_level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" lines are noise here
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (), str(path), kwargs=inputs, dynamo=True, opset_version=opset,
                input_names=list(inputs), output_names=[output],
                dynamic_shapes={name: {0: batch} for name in inputs},
                external_data=n_bytes > EXTERNAL_DATA_BYTES, optimize=True, verbose=False,
            )
    except DpkitError:
        raise
    except Exception as e:  # the exporter raises many types; the first line names the failing op
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DpkitError(f"ONNX export of {path.name} failed: {first}") from None
    finally:
        quiet.setLevel(old_level)


def export_policy(policy, out_dir: Path, opset: int, fp16: bool = False, gemm_conv: bool = True) -> dict[str, Path]:
    """Write encoder.onnx and denoiser.onnx into `out_dir`; returns their paths (gemm_conv: see graph_modules)."""
    modules = graph_modules(policy, fp16, gemm_conv)
    inputs = example_inputs(policy)
    paths = {}
    for name, output in (("encoder", "cond"), ("denoiser", "noise_pred")):
        paths[name] = out_dir / f"{name}.onnx"
        export_graph(modules[name], inputs[name], output, paths[name], opset)
    return paths
