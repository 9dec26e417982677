"""The translation tables: peer tensor names -> dpkit's (dpkit.train.policy.DiffusionPolicy state dict).

    unet_name("down_modules.0.0.blocks.0.block.0.weight")   # -> "denoiser.unet.down.0.0.block1.0.weight"
    resnet_name("backbone.5.0.downsample.1.weight")         # -> "encoder.image_encoder.trunk.stages.2.shortcut.1.weight"

The original diffusion_policy and lerobot share one U-Net and differ only in spelling (`blocks.0/1` vs
`conv1/conv2`, `down_modules.i.2.conv` vs `down_modules.i.2`); both spellings map here. The ResNet-18
names are torchvision's children indices (0 conv1, 1 bn1, 4..7 layer1..layer4), which both peers keep.
"""

from __future__ import annotations

import re

from dpkit.errors import DpkitError

# Not a name but a rule behind one: both peers build the U-Net's final conv block (`final_conv.0`) with
# GroupNorm's default of 8 groups whatever their n_groups is. Its tensors have the same shapes for any group
# count, so nothing but the outputs would show a wrong one (dpkit's `policy.final_norm_groups`).
PEER_FINAL_NORM_GROUPS = 8

_UNET_RULES = [
    (re.compile(r"^diffusion_step_encoder\.([13])\.(weight|bias)$"), r"step_encoder.\1.\2"),
    # residual blocks of the down/up levels and the middle: conv blocks, FiLM, residual 1x1 conv
    (re.compile(r"^(down|up)_modules\.(\d+)\.([01])\.(?:blocks\.0|conv1)\.block\.([01])\.(weight|bias)$"),
     r"\1.\2.\3.block1.\4.\5"),
    (re.compile(r"^(down|up)_modules\.(\d+)\.([01])\.(?:blocks\.1|conv2)\.block\.([01])\.(weight|bias)$"),
     r"\1.\2.\3.block2.\4.\5"),
    (re.compile(r"^(down|up)_modules\.(\d+)\.([01])\.cond_encoder\.1\.(weight|bias)$"), r"\1.\2.\3.film.1.\4"),
    (re.compile(r"^(down|up)_modules\.(\d+)\.([01])\.residual_conv\.(weight|bias)$"), r"\1.\2.\3.residual.\4"),
    (re.compile(r"^(down|up)_modules\.(\d+)\.2(?:\.conv)?\.(weight|bias)$"), r"\1.\2.2.\3"),
    (re.compile(r"^mid_modules\.(\d+)\.(?:blocks\.0|conv1)\.block\.([01])\.(weight|bias)$"), r"mid.\1.block1.\2.\3"),
    (re.compile(r"^mid_modules\.(\d+)\.(?:blocks\.1|conv2)\.block\.([01])\.(weight|bias)$"), r"mid.\1.block2.\2.\3"),
    (re.compile(r"^mid_modules\.(\d+)\.cond_encoder\.1\.(weight|bias)$"), r"mid.\1.film.1.\2"),
    (re.compile(r"^mid_modules\.(\d+)\.residual_conv\.(weight|bias)$"), r"mid.\1.residual.\2"),
    (re.compile(r"^final_conv\.0\.block\.([01])\.(weight|bias)$"), r"final.0.\1.\2"),
    (re.compile(r"^final_conv\.1\.(weight|bias)$"), r"final.1.\1"),
]

# a norm layer's tensors: GroupNorm's affine pair, plus BatchNorm's running statistics and batch counter
_NORM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_RESNET_RULES = [
    (re.compile(r"^backbone\.0\.weight$"), "stem.0.weight"),
    (re.compile(rf"^backbone\.1\.{_NORM}$"), r"stem.1.\1"),
    (re.compile(r"^backbone\.([4-7])\.([01])\.(conv[12])\.weight$"), None),
    (re.compile(rf"^backbone\.([4-7])\.([01])\.bn([12])\.{_NORM}$"), None),
    (re.compile(rf"^backbone\.([4-7])\.([01])\.downsample\.([01])\.{_NORM}$"), None),
]


def unet_name(name: str) -> str | None:
    """dpkit name of a peer U-Net tensor (given without the peer's prefix), or None when it is not one."""
    for pattern, repl in _UNET_RULES:
        if pattern.match(name):
            return "denoiser.unet." + pattern.sub(repl, name)
    return None


def resnet_name(name: str) -> str | None:
    """dpkit name of a peer image-encoder tensor (`backbone.*`, `pool.nets.*`, `out.*`), or None."""
    prefix = "encoder.image_encoder."
    m = re.match(r"^pool\.nets\.(weight|bias)$", name)
    if m:
        return f"{prefix}pool.keypoints.{m.group(1)}"
    m = re.match(r"^out\.(weight|bias)$", name)
    if m:
        return f"{prefix}out.{m.group(1)}"
    for pattern, repl in _RESNET_RULES:
        m = pattern.match(name)
        if not m:
            continue
        if repl is not None:
            return prefix + "trunk." + pattern.sub(repl, name)
        layer, block = int(m.group(1)) - 4, int(m.group(2))
        stage = f"{prefix}trunk.stages.{2 * layer + block}"
        if ".conv" in name:
            return f"{stage}.{m.group(3)}.weight"
        if ".bn" in name:
            return f"{stage}.norm{m.group(3)}.{m.group(4)}"
        return f"{stage}.shortcut.{m.group(3)}.{m.group(4)}"
    return None


def load_mapped(policy, weights: dict, source: str) -> None:
    """Copy `weights` (already dpkit names) into `policy`, refusing a missing, extra or misshapen tensor.

    Every weight of the denoiser and the image encoder must be given; the normalizers are set by the
    policy's constructor and are not taken from here."""
    import torch

    expected = {k: v for k, v in policy.state_dict().items() if "normalizer." not in k}
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise DpkitError(f"{source}: tensor {extra[0]!r} has no place in dpkit's model ({len(extra)} such)")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise DpkitError(f"{source}: no tensor for dpkit's {missing[0]!r} ({len(missing)} missing)")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise DpkitError(f"{source}: tensor for {k!r} has shape {list(v.shape)}, the config implies "
                             f"{list(expected[k].shape)}")
        if v.is_floating_point() != expected[k].is_floating_point():  # integer: BatchNorm's num_batches_tracked
            raise DpkitError(f"{source}: tensor for {k!r} is {v.dtype}, expected {expected[k].dtype}")
        if not bool(torch.isfinite(v).all()):
            raise DpkitError(f"{source}: tensor for {k!r} contains NaN or Inf")
    policy.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()}, strict=False)
