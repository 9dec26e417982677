"""dpkit-convert on the original diffusion_policy's hybrid image policy (DiffusionUnetHybridImagePolicy).

tests/data/peers/original_pusht_hybrid_tiny/ holds a checkpoint written by the original code's own
save_checkpoint (xz-compressed; robomimic ResNet-18 + GroupNorm + spatial softmax, PushT pusht_image, crop
84, small U-Net, sparse ResNet conv weights: see its README.txt) and reference.npz: real PushT frames, the
injected noise and the original policy's own predict_action outputs, DDPM-100 and DDIM-10. A converted
run must reproduce them, batch 3, in PyTorch and (slow) in ONNX Runtime and the C++ runtime after dpkit's
own export, by the rule of tests/peer_parity.py (against dpkit's float64 run of the converted network).
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from dpkit.convert.source import convert_policy
from dpkit.errors import DpkitError
from peer_parity import Case, Float64Runs, check_case, ddpm_step_noise
from test_convert import _refused

FIXTURE = Path(__file__).resolve().parent / "data" / "peers" / "original_pusht_hybrid_tiny"
HYBRID = "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The original's latest.ckpt, decompressed (the repository keeps it as latest.ckpt.xz)."""
    path = tmp_path_factory.mktemp("original_hybrid") / "latest.ckpt"
    with lzma.open(FIXTURE / "latest.ckpt.xz") as f:
        path.write_bytes(f.read())
    return path


@pytest.fixture(scope="module")
def run(ckpt, tmp_path_factory) -> Path:
    return Path(convert_policy(ckpt, tmp_path_factory.mktemp("converted") / "hybrid")["out"])


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "reference.npz"))


def _obs(ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": ref["obs_image"], "agent_pos": ref["obs_agent_pos"]}


@pytest.fixture(scope="module")
def truth(run) -> Float64Runs:
    return Float64Runs(lambda _name: run)


def _cases(ref: dict[str, np.ndarray]) -> list[Case]:
    return [Case("ddpm", 100, ref["ddpm_initial_noise"], ddpm_step_noise(ref["ddpm_step_noise"]),
                 ref["ddpm_normalized_trajectory"], ref["ddpm_action"]),
            Case("ddim", 10, ref["ddim10_initial_noise"], None, ref["ddim10_normalized_trajectory"],
                 ref["ddim10_action"])]


def _check_policy(policy, ref: dict[str, np.ndarray], truth: Float64Runs) -> None:
    obs = _obs(ref)
    assert obs["image"].shape[:2] == (3, 2) and 0.0 <= obs["image"].min() and obs["image"].max() <= 1.0
    for case in _cases(ref):
        check_case(policy, obs, case, truth.get("hybrid", case, obs))


def test_converted_hybrid_reproduces_the_original_in_torch(run, ref, truth):
    from dpkit.runtime import load_policy

    policy = load_policy(run, backend="torch")
    assert list(policy.obs_keys) == ["image", "agent_pos"]  # the original's per-step order
    choice = policy.resolve_sampler()  # the workspace's DDPMScheduler with num_inference_steps 100
    assert (choice.sampler, choice.num_inference_steps) == ("ddpm", 100)
    _check_policy(policy, ref, truth)
    # the condition alone: robomimic's encoder output per step [image feature (64), agent_pos (2)]
    with torch.no_grad():
        cond = policy.policy.encoder(torch.from_numpy(ref["obs_image"]), torch.from_numpy(ref["obs_agent_pos"]))
    assert cond.shape == ref["global_cond"].shape == (3, 2 * 66)
    assert np.abs(cond.numpy() - ref["global_cond"]).max() <= 1e-5

    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    src = state["source"]
    assert src["format"] == "diffusion_policy" and src["policy"] == HYBRID and src["weights"] == "ema_model"
    assert src["observations"] == {"image": "image", "agent_pos": "agent_pos"} and len(src["sha256"]) == 64
    p = state["config"]["policy"]
    assert (p["obs_mode"], p["crop_size"], p["resnet_width"], p["spatial_softmax_keypoints"],
            p["image_feature_dim"]) == ("image", 84, 64, 32, 64)
    assert p["image_mean"] == [0.5] * 3 and p["image_std"] == [0.5] * 3  # the original's x * 2 - 1
    facts = json.loads((FIXTURE / "facts.json").read_text())
    assert facts["cfg_policy"]["_target_"] == HYBRID and facts["cfg_policy"]["crop_shape"] == [84, 84]


def test_no_ema_takes_the_trained_weights(ckpt, tmp_path, ref, truth):
    from dpkit.runtime import load_policy

    summary = convert_policy(ckpt, tmp_path / "raw", ema=False)
    assert summary["source"]["weights"] == "model" and summary["observations"] == ["image", "agent_pos"]
    # the fixture saved before any training step, so its EMA copy equals the model (README.txt)
    _check_policy(load_policy(tmp_path / "raw", backend="torch"), ref, truth)


def test_converted_hybrid_is_evaluated_in_gym_pusht(run):
    pytest.importorskip("gym_pusht")
    from dpkit.eval.evaluate import evaluate_policy
    from dpkit.runtime import load_policy

    report = evaluate_policy(load_policy(run, backend="torch"), episodes=2, max_steps=8, progress=False)
    assert report["n_episodes"] == 2 and [e["steps"] for e in report["episodes"]] == [8, 8]
    assert 0.0 <= report["score"] <= 1.0


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory) -> Path:
    from dpkit.export.writer import export_bundle

    out = tmp_path_factory.mktemp("converted_bundle") / "hybrid"
    export_bundle(run, out, ddim_steps=(10,), data=str(out.parent / "no_dataset"))
    return out


@pytest.mark.parametrize("backend", ["ort", "cpp"])
def test_exported_bundle_reproduces_the_original(bundle, ref, truth, backend):
    from dpkit.runtime import load_policy

    policy = load_policy(bundle, backend=backend)
    _check_policy(policy, ref, truth)
    manifest = json.loads((bundle / "policy.json").read_text())
    assert [o["name"] for o in manifest["observations"]] == ["image", "agent_pos"]
    assert manifest["scheduler"]["default_sampler"] == "ddpm-100"
    assert manifest["source"]["converted_from"]["format"] == "diffusion_policy"


# ---- bad sources: one line, exit 1, nothing at --out -------------------------------------------------

def _patched(monkeypatch, edit) -> None:
    """Make the reader see the fixture's payload changed by `edit(payload)` (the file itself stays intact)."""
    import dpkit.convert.original as original

    real = original.load_torch_zip

    def patched(path):
        payload = real(path)
        edit(payload)
        return payload

    monkeypatch.setattr(original, "load_torch_zip", patched)


@pytest.mark.parametrize("field,value,needle", [
    ("obs_encoder_group_norm", False, "BatchNorm"),
    ("eval_fixed_crop", False, "center crop"),
    ("crop_shape", [84, 76], "square crop"),
    ("obs_as_global_cond", False, "needs True"),
    ("cond_predict_scale", False, "FiLM"),
])
def test_unsupported_field_is_named(ckpt, tmp_path, capsys, monkeypatch, field, value, needle):
    _patched(monkeypatch, lambda p: p["cfg"]["policy"].__setitem__(field, value))
    _refused(capsys, [str(ckpt)], tmp_path / "out", f"cfg.policy.{field} = {value!r}", needle)


def test_two_cameras_refused(ckpt, tmp_path, capsys, monkeypatch):
    def edit(p):
        p["cfg"]["policy"]["shape_meta"]["obs"]["wrist"] = {"shape": [3, 96, 96], "type": "rgb"}

    _patched(monkeypatch, edit)
    _refused(capsys, [str(ckpt)], tmp_path / "out", "shape_meta.obs (rgb keys)", "'wrist'", "one camera")


def test_other_image_size_refused(ckpt, tmp_path, capsys, monkeypatch):
    _patched(monkeypatch, lambda p: p["cfg"]["policy"]["shape_meta"]["obs"]["image"].__setitem__("shape", [3, 84, 84]))
    _refused(capsys, [str(ckpt)], tmp_path / "out", "cfg.policy.shape_meta.obs.image.shape = [3, 84, 84]")


def test_mismatched_tensor_shape(ckpt, tmp_path, capsys, monkeypatch):
    _patched(monkeypatch, lambda p: p["cfg"]["policy"].__setitem__("down_dims", [32, 64, 128]))
    _refused(capsys, [str(ckpt)], tmp_path / "out", "has shape", "the config implies")


def test_other_crop_mismatches_the_spatial_softmax_grid(ckpt, tmp_path, capsys, monkeypatch):
    # crop 64 gives a 2x2 feature map; the checkpoint's pool was built for crop 84 (3x3)
    _patched(monkeypatch, lambda p: p["cfg"]["policy"].__setitem__("crop_shape", [64, 64]))
    _refused(capsys, [str(ckpt)], tmp_path / "out", "spatial softmax grid", "crop 64")


def test_second_name_of_a_tensor_must_agree(ckpt, tmp_path, capsys, monkeypatch):
    key = "obs_encoder.obs_nets.image.nets.0.nets.4.0.conv1.weight"  # = ...backbone.nets.4.0.conv1.weight

    def edit(p):
        sd = p["state_dicts"]["ema_model"]
        sd[key] = sd[key].clone() + 1.0

    _patched(monkeypatch, edit)
    _refused(capsys, [str(ckpt)], tmp_path / "out", key, "differs from", "backbone.nets.4.0.conv1.weight")


def test_per_channel_image_normalizer_refused(ckpt, tmp_path, capsys, monkeypatch):
    def edit(p):
        p["state_dicts"]["ema_model"]["normalizer.params_dict.image.scale"] = torch.tensor([2.0, 2.0, 2.0])

    _patched(monkeypatch, edit)
    _refused(capsys, [str(ckpt)], tmp_path / "out", "'image' normalizer", "one finite affine map")


def test_spatial_softmax_temperature_refused(ckpt, tmp_path, monkeypatch):
    def edit(p):
        for name in ("pool.temperature", "nets.1.temperature"):
            p["state_dicts"]["ema_model"][f"obs_encoder.obs_nets.image.{name}"] = torch.tensor([2.0])

    _patched(monkeypatch, edit)
    with pytest.raises(DpkitError, match="temperature"):
        convert_policy(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_ckpt_refused(ckpt, tmp_path, capsys):
    data = ckpt.read_bytes()
    (tmp_path / "latest.ckpt").write_bytes(data[: len(data) // 2])
    _refused(capsys, [str(tmp_path / "latest.ckpt")], tmp_path / "out", "latest.ckpt")


def test_fixture_is_small_and_documented():
    files = {p.name: p.stat().st_size for p in FIXTURE.iterdir()}
    assert {"latest.ckpt.xz", "reference.npz", "README.txt", "make_original_hybrid.py"} <= set(files)
    assert sum(files.values()) < 3_000_000
    with lzma.open(FIXTURE / "latest.ckpt.xz") as f:
        assert f.read(2) == b"PK"  # a torch zip archive inside
