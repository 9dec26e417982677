"""Building blocks of the policy: normalizer, conditional U-Net, image encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpkit.errors import DpkitError
from dpkit.train.config import load_config
from dpkit.train.normalizer import Normalizer
from dpkit.train.unet import ConditionalUnet1D
from dpkit.train.vision import ImageEncoder, ResNet18Trunk



# ---- Normalizer -----------------------------------------------------------------------------------


def _fit_example() -> tuple[Normalizer, np.ndarray]:
    rng = np.random.default_rng(0)
    action = rng.uniform([10, 100], [500, 300], size=(7, 5, 2))  # leading axes all reduced
    obs = rng.uniform(0, 512, size=(40, 3))
    obs[:, 1] = 42.0  # a constant dimension
    return Normalizer.fit({"action": action, "obs": obs}), action


def test_normalizer_maps_range_to_unit_interval_and_round_trips():
    norm, action = _fit_example()
    x = torch.as_tensor(action, dtype=torch.float32)
    y = norm.normalize("action", x)
    flat = y.reshape(-1, 2)
    assert torch.allclose(flat.min(0).values, torch.tensor([-1.0, -1.0]), atol=1e-5)
    assert torch.allclose(flat.max(0).values, torch.tensor([1.0, 1.0]), atol=1e-5)
    assert torch.allclose(norm.unnormalize("action", y), x, atol=1e-3)
    scale, offset = norm.unnormalize_affine("action")
    assert np.allclose(y.numpy() * scale + offset, action, atol=1e-3)


def test_normalizer_constant_dimension_maps_to_zero():
    norm, _ = _fit_example()
    x = torch.tensor([[3.0, 42.0, 100.0]])
    y = norm.normalize("obs", x)
    assert y[0, 1].item() == 0.0
    assert torch.isfinite(y).all()
    assert torch.allclose(norm.unnormalize("obs", y), x, atol=1e-4)


def test_normalizer_dict_round_trip_through_json():
    norm, action = _fit_example()
    d = json.loads(json.dumps(norm.to_dict()))
    assert set(d) == {"action", "obs"} and set(d["action"]) == {"min", "max", "scale", "offset"}
    back = Normalizer.from_dict(d)
    assert back.keys == ["action", "obs"]
    x = torch.as_tensor(action, dtype=torch.float32)
    assert torch.equal(back.normalize("action", x), norm.normalize("action", x))
    # Buffers: they are in the state dict (checkpoints) and follow .to().
    assert "stats.action.scale" in norm.state_dict()


def test_normalizer_errors():
    norm, _ = _fit_example()
    with pytest.raises(DpkitError, match="'agent_pos'"):
        norm.normalize("agent_pos", torch.zeros(2))
    with pytest.raises(DpkitError, match="last dimension 2"):
        norm.normalize("action", torch.zeros(4, 3))
    with pytest.raises(DpkitError, match="NaN"):
        Normalizer.fit({"action": np.array([[0.0, np.nan]])})
    with pytest.raises(DpkitError, match="lacks 'offset'"):
        Normalizer.from_dict({"action": {"min": [0], "max": [1], "scale": [1]}})


# ---- U-Net ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("horizon", [16, 10])
@pytest.mark.parametrize("skip", ["concat", "add"])
def test_unet_shapes_and_conditioning(horizon, skip):
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, 12, 16, (16, 32, 64), kernel_size=5, n_groups=8, skip_connection=skip).eval()
    x, cond = torch.randn(3, horizon, 2), torch.randn(3, 12)
    t = torch.tensor([0, 50, 99])
    out = net(x, t, cond)
    assert out.shape == (3, horizon, 2) and torch.isfinite(out).all()
    # A scalar timestep broadcasts over the batch.
    assert torch.allclose(net(x, torch.tensor(50), cond)[1], out[1], atol=1e-6)
    # Both the step and the observation condition reach the output (FiLM is wired).
    assert not torch.allclose(net(x, t + 1, cond), out)
    assert not torch.allclose(net(x, t, cond + 1), out)
    # Samples in a batch are independent (GroupNorm normalizes per sample).
    assert torch.allclose(net(x[:1], t[:1], cond[:1]), out[:1], atol=1e-5)


def test_unet_parameter_count_of_paper_config():
    cfg = load_config("pusht_lowdim").policy
    net = ConditionalUnet1D(
        cfg.action_dim, cfg.n_obs_steps * 20, cfg.diffusion_step_embed_dim, cfg.down_dims, cfg.kernel_size, cfg.n_groups
    )
    n = sum(p.numel() for p in net.parameters())
    print(f"pusht_lowdim U-Net parameters: {n / 1e6:.2f} M")
    assert 60e6 < n < 70e6  # the paper's ~65 M


# ---- Image encoder --------------------------------------------------------------------------------


def test_resnet_output_size_formula():
    trunk = ResNet18Trunk(width=8)
    for size in (84, 96, 50, 33, 16):
        assert trunk(torch.zeros(1, 3, size, size)).shape == (1, 64, *(2 * [ResNet18Trunk.output_size(size)]))


def test_image_encoder_crops():
    torch.manual_seed(0)
    enc = ImageEncoder(image_size=96, crop_size=84, width=8, num_keypoints=4, feature_dim=10)
    img = torch.arange(96 * 96, dtype=torch.float32).reshape(1, 1, 96, 96).expand(6, 3, 96, 96)
    enc.eval()
    assert torch.equal(enc.crop(img), img[:, :, 6:90, 6:90])
    assert enc(img).shape == (6, 10)
    enc.train()
    crops = enc.crop(img)
    assert crops.shape == (6, 3, 84, 84)
    # Each crop is a contiguous window of the source, at its own offset per image.
    tops = (crops[:, 0, 0, 0] // 96).long()
    lefts = (crops[:, 0, 0, 0] % 96).long()
    for i in range(6):
        assert torch.equal(crops[i], img[i, :, tops[i] : tops[i] + 84, lefts[i] : lefts[i] + 84])
    assert len(set(zip(tops.tolist(), lefts.tolist()))) > 1
    assert (enc(img) >= 0).all()  # ReLU head
