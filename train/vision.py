"""Image encoder: crop -> ResNet-18 trunk (GroupNorm or BatchNorm) -> spatial softmax keypoints -> Linear + ReLU.

    enc = ImageEncoder(96, crop_size=84, width=64, num_keypoints=32, feature_dim=64)   # norm="group"
    feats = enc(images)      # (N, 3, 96, 96), normalized -> (N, 64)

Written here because torchvision does not import beside the pinned torch. GroupNorm (`norm="group"`, the
default) replaces BatchNorm as in Diffusion Policy, because batch statistics interact badly with EMA weights
and small batches. `norm="batch"` keeps torchvision's BatchNorm2d (eps 1e-5, momentum 0.1): it exists for
policies trained elsewhere with it (lerobot's `use_group_norm: false`); in eval mode it applies its running
statistics, which export to ONNX as constants; in training mode it uses and updates the batch statistics.
Training mode crops at a random offset per image; eval mode takes the center crop by static slicing, so
the exported graph has no randomness and no data-dependent shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpkit.errors import DpkitError
from dpkit.train.config import ENCODER_NORMS


def _norm(channels: int, kind: str) -> nn.Module:
    """The trunk's normalization layer: GroupNorm of channels // 16 groups, or BatchNorm2d."""
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 16), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise DpkitError(f"image encoder norm must be one of {', '.join(ENCODER_NORMS)}, got {kind!r}")


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str = "group"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_ch, norm)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _norm(out_ch, norm)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(out_ch, norm))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNet18Trunk(nn.Module):
    """ResNet-18 without the final pool and fc: (N, 3, S, S) -> (N, 8*width, ceil(S/32), ceil(S/32))."""

    def __init__(self, width: int = 64, norm: str = "group"):
        super().__init__()
        self.out_channels = 8 * width
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            _norm(width, norm),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        in_ch = width
        for i, out_ch in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(in_ch, out_ch, stride, norm), BasicBlock(out_ch, out_ch, 1, norm)]
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)

    @staticmethod
    def output_size(size: int) -> int:
        # stem conv, max pool and three strided stages each map L -> ceil(L / 2) with these paddings
        for _ in range(5):
            size = (size + 1) // 2
        return size

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


class SpatialSoftmax(nn.Module):
    """1x1 conv to K maps; softmax over positions; expected (x, y) in [-1, 1] of each -> (N, 2K)."""

    def __init__(self, in_channels: int, height: int, width: int, num_keypoints: int):
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        # (H*W, 2) grid of (x, y); fixed by the crop size, so kept out of the checkpoint.
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1), persistent=False)

    def forward(self, feat: Tensor) -> Tensor:
        logits = self.keypoints(feat).flatten(2)  # (N, K, H*W)
        attention = torch.softmax(logits, dim=-1)
        return (attention @ self.grid).flatten(1)  # (N, K, 2) -> (N, 2K)


class ImageEncoder(nn.Module):
    """(N, 3, S, S) images -> (N, feature_dim); crops to `crop_size` (random in training, center in eval).

    `norm` is the trunk's normalization, "group" or "batch" (see the module docstring)."""

    def __init__(self, image_size: int, crop_size: int, width: int, num_keypoints: int, feature_dim: int,
                 norm: str = "group"):
        super().__init__()
        if not 1 <= crop_size <= image_size:
            raise DpkitError(f"crop_size {crop_size} must be in [1, {image_size}]")
        self.image_size = image_size
        self.crop_size = crop_size
        self.trunk = ResNet18Trunk(width, norm)
        side = ResNet18Trunk.output_size(crop_size)
        self.pool = SpatialSoftmax(self.trunk.out_channels, side, side, num_keypoints)
        self.out = nn.Linear(2 * num_keypoints, feature_dim)
        self.feature_dim = feature_dim

    def crop(self, x: Tensor) -> Tensor:
        c, s = self.crop_size, self.image_size
        if c == s:
            return x
        if not self.training:
            top = (s - c) // 2
            return x[:, :, top : top + c, top : top + c]
        # Independent offset per image, gathered with one advanced-indexing op instead of a Python loop.
        n = x.shape[0]
        top = torch.randint(0, s - c + 1, (n, 1), device=x.device)
        left = torch.randint(0, s - c + 1, (n, 1), device=x.device)
        span = torch.arange(c, device=x.device)
        rows = (top + span)[:, :, None]  # (N, c, 1)
        cols = (left + span)[:, None, :]  # (N, 1, c)
        idx = torch.arange(n, device=x.device)[:, None, None]
        return x.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)  # (N, c, c, 3) -> (N, 3, c, c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.out(self.pool(self.trunk(self.crop(x)))))
