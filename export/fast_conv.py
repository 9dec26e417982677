"""Export-time stand-ins for nn.Conv1d / nn.ConvTranspose1d that do one GEMM over the whole batch.

    from dpkit.export.fast_conv import batch_gemm_convs
    den = batch_gemm_convs(copy.deepcopy(policy.denoiser))   # in place on the copy; same numbers

Why: ONNX Runtime's CPU Conv kernel does one im2col + GEMM per batch sample. The denoiser's time axis is
tiny (H = 16, 8, 4), so every per-sample GEMM streams the whole weight matrix and latency grows linearly
with batch. Here the k shifted (and, for stride 2, strided) slices of the padded input are gathered with
static Slice/Concat (the time length is a fixed model dimension; only the batch is dynamic), laid out as
(B, L, k*Cin) and multiplied by a (k*Cin, Cout) weight: ONNX Runtime flattens a N-D x 2-D MatMul into a
single (B*L, k*Cin) x (k*Cin, Cout) GEMM. Slice, Concat, Transpose, Reshape and MatMul are all ops that
TensorRT's ONNX parser takes. The weights are re-laid-out copies; the training model is not touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GemmConv1d(nn.Module):
    """nn.Conv1d (zero padding, no dilation, one group) as gather-slices + one MatMul."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.k, self.stride, self.pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        w = conv.weight.detach()  # (Cout, Cin, k)
        # Row j*Cin + c of the (k*Cin, Cout) matrix multiplies tap j of input channel c.
        self.weight = nn.Parameter(w.permute(2, 1, 0).reshape(-1, w.shape[0]).contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[-1]  # static in the exported graph
        # Time-major first: a Transpose feeding the MatMul directly would be fused by ORT into a
        # FusedMatMul(transA) that again runs one GEMM per sample.
        x = x.transpose(1, 2)  # (B, L, Cin)
        if self.pad:
            x = F.pad(x, (0, 0, self.pad, self.pad))
        n_out = (length + 2 * self.pad - self.k) // self.stride + 1
        span = self.stride * (n_out - 1) + 1
        taps = [x[:, j : j + span : self.stride] for j in range(self.k)]
        cols = torch.cat(taps, dim=2) if self.k > 1 else taps[0]  # (B, L_out, k*Cin)
        y = cols @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(1, 2)


class GemmConvTranspose1d(nn.Module):
    """nn.ConvTranspose1d with L_out = stride * L_in (e.g. k=4, s=2, p=1) as one MatMul.

    Output position s*m + r (phase r) sums x[m - d] @ W[:, :, s*d + r + p] over the offsets d where that
    tap exists; the GEMM computes all phases at once from the gathered x[m - d] and the phases are then
    interleaved along time.
    """

    def __init__(self, conv: nn.ConvTranspose1d):
        super().__init__()
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        w = conv.weight.detach()  # (Cin, Cout, k)
        cin, cout = w.shape[0], w.shape[1]
        self.stride = s
        taps = {(d, r): s * d + r + p for r in range(s) for d in range(-k, k + 1) if 0 <= s * d + r + p < k}
        self.offsets = sorted({d for d, _ in taps})
        weight = w.new_zeros(len(self.offsets), cin, s, cout)
        for (d, r), j in taps.items():
            weight[self.offsets.index(d), :, r, :] = w[:, :, j]
        self.weight = nn.Parameter(weight.reshape(len(self.offsets) * cin, s * cout), requires_grad=False)
        bias = torch.zeros(cout) if conv.bias is None else conv.bias.detach()
        self.bias = nn.Parameter(bias.repeat(s).clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[-1]
        left, right = max(max(self.offsets), 0), max(-min(self.offsets), 0)
        xp = F.pad(x.transpose(1, 2), (0, 0, left, right))  # time-major, as in GemmConv1d
        # x[m - d] for m in [0, L) sits at xp[m - d + left].
        taps = [xp[:, left - d : left - d + length] for d in self.offsets]
        cols = torch.cat(taps, dim=2) if len(taps) > 1 else taps[0]  # (B, L, n*Cin)
        y = cols @ self.weight + self.bias  # (B, L, s*Cout): phase-major per position
        y = y.reshape(y.shape[0], length * self.stride, -1)  # interleave phases along time
        return y.transpose(1, 2)


def _supported(m: nn.Module) -> bool:
    if type(m) is nn.Conv1d:
        return m.dilation[0] == 1 and m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
    if type(m) is nn.ConvTranspose1d:
        k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
        return m.dilation[0] == 1 and m.groups == 1 and m.output_padding[0] == 0 and k - 2 * p == s
    return False


def batch_gemm_convs(module: nn.Module) -> nn.Module:
    """In place: every supported Conv1d / ConvTranspose1d child replaced by its GEMM form; returns module."""
    for name, child in list(module.named_children()):
        if _supported(child):
            gemm = GemmConv1d(child) if type(child) is nn.Conv1d else GemmConvTranspose1d(child)
            setattr(module, name, gemm.to(child.weight.device))
        else:
            batch_gemm_convs(child)
    return module
