"""The Diffusion Policy CNN denoiser: a 1D temporal U-Net conditioned by FiLM on (diffusion step, observation).

    net = ConditionalUnet1D(input_dim=2, global_cond_dim=40, diffusion_step_embed_dim=256,
                            down_dims=(256, 512, 1024), kernel_size=5, n_groups=8, final_norm_groups=8)
    eps = net(sample, timestep, global_cond)        # (B, H, A), (B,) int64, (B, C) -> (B, H, A)

Every op is chosen to export with `torch.onnx.export(dynamo=True)` and to run in TensorRT: Mish is
spelled `x * tanh(softplus(x))`, there is no data-dependent control flow, and the only shape logic
(padding the time axis to a multiple of 2**(levels-1)) depends on the static horizon H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpkit.errors import DpkitError


class Mish(nn.Module):
    # Written out so exporters emit Softplus/Tanh/Mul (supported everywhere) rather than a Mish op.
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.tanh(F.softplus(x))


class SinusoidalStepEmbedding(nn.Module):
    """Integer diffusion step -> [sin(t * f_i), cos(t * f_i)] with geometric frequencies f_i."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / max(half - 1, 1)))
        self.register_buffer("freqs", freqs, persistent=False)  # derived from dim; not a checkpoint value

    def forward(self, t: Tensor) -> Tensor:
        args = t.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, length-preserving."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int):
        super().__init__(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_ch),
            Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks; the condition sets a per-channel scale and bias (FiLM) between them."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.out_ch = out_ch
        self.block1 = Conv1dBlock(in_ch, out_ch, kernel_size, n_groups)
        self.block2 = Conv1dBlock(out_ch, out_ch, kernel_size, n_groups)
        self.film = nn.Sequential(Mish(), nn.Linear(cond_dim, 2 * out_ch))
        self.residual = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.block1(x)
        scale, bias = self.film(cond).unflatten(1, (2, self.out_ch)).unsqueeze(-1).unbind(1)
        h = self.block2(h * scale + bias)
        return h + self.residual(x)


class ConditionalUnet1D(nn.Module):
    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        diffusion_step_embed_dim: int = 256,
        down_dims: tuple[int, ...] | list[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        skip_connection: str = "concat",
        final_norm_groups: int | None = None,
    ):
        """`final_norm_groups`: GroupNorm groups of the final conv block; None uses `n_groups` (see
        PolicyConfig.final_norm_groups: the original and lerobot use 8 there whatever n_groups is)."""
        super().__init__()
        if skip_connection not in ("concat", "add"):
            raise DpkitError(f"skip_connection must be 'concat' or 'add', got {skip_connection!r}")
        if diffusion_step_embed_dim < 2 or diffusion_step_embed_dim % 2:
            raise DpkitError(f"diffusion_step_embed_dim must be even (sin and cos halves), got {diffusion_step_embed_dim}")
        self.skip_connection = skip_connection
        self.levels = len(down_dims)
        # Every level but the last halves the time axis; H is padded up to a multiple of this.
        self.time_multiple = 2 ** (self.levels - 1)

        dsed = diffusion_step_embed_dim
        self.step_encoder = nn.Sequential(
            SinusoidalStepEmbedding(dsed), nn.Linear(dsed, 4 * dsed), Mish(), nn.Linear(4 * dsed, dsed)
        )
        cond_dim = dsed + global_cond_dim

        def block(i: int, o: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(i, o, cond_dim, kernel_size, n_groups)

        dims = [input_dim, *down_dims]
        self.down = nn.ModuleList()
        for lvl, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = lvl == self.levels - 1
            self.down.append(nn.ModuleList([
                block(d_in, d_out),
                block(d_out, d_out),
                nn.Conv1d(d_out, d_out, 3, stride=2, padding=1) if not last else nn.Identity(),
            ]))
        self.mid = nn.ModuleList([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])

        # Decoder levels mirror the encoder's deeper levels; as in the original, the shallowest encoder
        # feature map is not used as a skip (the final conv block works at that width instead).
        skip_mult = 2 if skip_connection == "concat" else 1
        self.up = nn.ModuleList()
        for d_in, d_out in reversed(list(zip(dims[1:-1], dims[2:]))):
            self.up.append(nn.ModuleList([
                block(d_out * skip_mult, d_in),
                block(d_in, d_in),
                nn.ConvTranspose1d(d_in, d_in, 4, stride=2, padding=1),
            ]))
        # The final block's groups are a separate rule: the tensors have the same shapes for any value, so a
        # wrong one loads and runs silently (only the outputs show it).
        final_groups = n_groups if final_norm_groups is None else final_norm_groups
        if down_dims[0] % final_groups:
            raise DpkitError(f"final_norm_groups={final_groups} does not divide down_dims[0]={down_dims[0]}")
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, final_groups), nn.Conv1d(down_dims[0], input_dim, 1)
        )

    def forward(self, sample: Tensor, timestep: Tensor | int, global_cond: Tensor) -> Tensor:
        """sample (B, H, A), timestep (B,) int64 or scalar, global_cond (B, C) -> (B, H, A)."""
        batch, horizon = sample.shape[0], sample.shape[1]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() == 0:
            t = t.expand(batch)
        cond = torch.cat([self.step_encoder(t), global_cond], dim=-1)

        x = sample.transpose(1, 2)  # (B, A, H): channels first for Conv1d
        pad = (-horizon) % self.time_multiple  # static: H is a fixed model dimension
        if pad:
            x = F.pad(x, (0, pad))  # zero padding at the end, cropped off below

        skips = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for res in self.mid:
            x = res(x, cond)
        for res1, res2, upsample in self.up:
            skip = skips.pop()
            x = torch.cat([x, skip], dim=1) if self.skip_connection == "concat" else x + skip
            x = upsample(res2(res1(x, cond), cond))
        x = self.final(x)
        if pad:
            x = x[:, :, :horizon]
        return x.transpose(1, 2)
