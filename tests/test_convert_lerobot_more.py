"""dpkit-convert against two more fixtures made by lerobot's own code (tests/data/peers/, README.txt in each).

- lerobot_pusht_image_batchnorm: lerobot 0.6.1, one camera, `use_group_norm: false` (the ResNet-18 keeps
  torchvision's BatchNorm; non-trivial running statistics), a separate encoder per camera (tensors under
  `rgb_encoder.0.`), processor-file statistics. Its weights are committed xz-compressed; the tests
  decompress them into tmp_path.
- lerobot033_pusht_keypoints: lerobot 0.3.3, state-only, the older layout with the statistics as buffers
  inside model.safetensors (normalize_inputs.* / normalize_targets.* / unnormalize_outputs.*).

A converted run must reproduce lerobot's trajectories within 1e-4 (normalized) and its executed actions
within 1e-3 px, DDPM-100 and DDIM-10, batch 2, in PyTorch; and (slow) in ONNX Runtime and the C++ runtime
after dpkit's own export, where DDIM-10's actions are held to test_convert's runtime bound (imported, so both
tighten together). The BatchNorm fixture also holds lerobot's own float64 run: on its network DDIM-10 moves
lerobot's float32 actions 1.1e-3 px from the exact ones (dpkit's float32: 1.0e-3 px), so the action bound
there is 1e-3 px plus lerobot's own float32 error, measured from that run.
"""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpkit.convert.source import convert_policy
from dpkit.errors import DpkitError
from test_convert import ACTION_TOL_PX, RUNTIME_DDIM_ACTION_TOL_PX, TRAJ_TOL, _refused

PEERS = Path(__file__).resolve().parent / "data" / "peers"
BN, OLD = "lerobot_pusht_image_batchnorm", "lerobot033_pusht_keypoints"
FIXTURES = [BN, OLD]
EXPECTED_OBS = {BN: ["state", "image"], OLD: ["state", "environment_state"]}
LAYOUT = {BN: "lerobot >= 0.4 (processor files)", OLD: "model.safetensors buffers (lerobot <= 0.3)"}
SOURCE_FILES = {BN: ("config.json", "policy_postprocessor.json", "policy_preprocessor.json",
                     "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
                     "policy_preprocessor_step_3_normalizer_processor.safetensors"),
                OLD: ("config.json", "model.safetensors")}


def _source(name: str, dst: Path) -> Path:
    """The lerobot folder as save_pretrained wrote it (the BN fixture's weights decompressed)."""
    dst.mkdir(parents=True)
    for f in SOURCE_FILES[name]:
        shutil.copy(PEERS / name / f, dst / f)
    if (PEERS / name / "model.safetensors.xz").is_file():
        (dst / "model.safetensors").write_bytes(lzma.decompress((PEERS / name / "model.safetensors.xz").read_bytes()))
    return dst


def _reference(name: str) -> dict:
    r = dict(np.load(PEERS / name / "reference.npz"))
    obs = {k[len("obs_"):]: r[k] for k in ("obs_state", "obs_environment_state", "obs_image") if k in r}
    ddim = "ddim10_" if "ddim10_trajectory_normalized" in r else ""
    return {"obs": obs, "initial_noise": r["initial_noise"], "step_noise": r["ddpm100_step_noise"],
            "ddpm_traj": r["ddpm100_trajectory_normalized"], "ddpm_actions": r["ddpm100_actions"],
            "ddim_traj": r[f"{ddim}trajectory_normalized"], "ddim_actions": r[f"{ddim}actions"],
            "ddpm_first": r["ddpm100_select_action_first_step"], "raw": r}


def _step_noise(ref: dict) -> np.ndarray:
    # dpkit's step_noise has one slice per step (K = 100); the last (t = 0) is unused, as in lerobot.
    return np.concatenate([ref["step_noise"], np.zeros_like(ref["step_noise"][:1])])


def _diffs(policy, name: str) -> dict[str, float]:
    """Max abs differences to lerobot's own outputs, DDPM-100 and DDIM-10."""
    ref = _reference(name)
    obs = ref["obs"]
    assert next(iter(obs.values())).shape[0] >= 2
    out = {}
    traj = policy.sample(obs, sampler="ddpm", steps=100, initial_noise=ref["initial_noise"],
                         step_noise=_step_noise(ref))
    out["ddpm_traj"] = float(np.abs(traj - ref["ddpm_traj"]).max())
    out["ddpm_actions"] = float(np.abs(policy.executed_actions(traj) - ref["ddpm_actions"]).max())
    traj = policy.sample(obs, sampler="ddim", steps=10, initial_noise=ref["initial_noise"])
    out["ddim_traj"] = float(np.abs(traj - ref["ddim_traj"]).max())
    out["ddim_actions"] = float(np.abs(policy.executed_actions(traj) - ref["ddim_actions"]).max())
    return out


def _float32_floor_px(policy, name: str, sampler: str) -> float:
    """How far lerobot's own float32 executed actions are from its float64 run of the same network and draws
    (px; 0 where the fixture has no float64 run). Two float32 implementations can each be this far from the
    exact result, so this much of their difference is rounding, not conversion."""
    r = _reference(name)["raw"]
    key = "ddpm100_trajectory_normalized" if sampler == "ddpm" else "trajectory_normalized"
    if f"{key}_float64" not in r:
        return 0.0
    return float(np.abs(policy.executed_actions(r[key]) - policy.executed_actions(r[f"{key}_float64"])).max())


def _check(policy, name: str, ddim_action_tol: float = ACTION_TOL_PX) -> None:
    d = _diffs(policy, name)
    assert d["ddpm_traj"] <= TRAJ_TOL and d["ddim_traj"] <= TRAJ_TOL, d
    assert d["ddpm_actions"] <= ACTION_TOL_PX + _float32_floor_px(policy, name, "ddpm"), d
    assert d["ddim_actions"] <= ddim_action_tol + _float32_floor_px(policy, name, "ddim"), d


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted_more")
    return {n: Path(convert_policy(_source(n, root / "src" / n), root / n)["out"]) for n in FIXTURES}


@pytest.mark.parametrize("name", FIXTURES)
def test_converted_run_reproduces_lerobot_in_torch(runs, name):
    from dpkit.runtime import load_policy

    policy = load_policy(runs[name], backend="torch")
    assert list(policy.obs_keys) == EXPECTED_OBS[name]
    choice = policy.resolve_sampler()  # both were saved with lerobot's default DDPM, num_inference_steps null
    assert (choice.sampler, choice.num_inference_steps) == ("ddpm", 100)
    _check(policy, name)
    state = json.loads(next((runs[name] / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["source"]["format"] == "lerobot" and state["source"]["version"] == LAYOUT[name]
    assert state["config"]["policy"].get("encoder_norm", "group") == ("batch" if name == BN else "group")


@pytest.mark.parametrize("name", FIXTURES)
def test_first_env_step_matches_lerobot_select_action(runs, name):
    """lerobot's select_action on the first step fills its queue with copies of that frame; with the same
    global-RNG draws (the fixture's seed is set before both calls) it returns the first executed action."""
    from dpkit.runtime import load_policy

    policy = load_policy(runs[name], backend="torch")
    ref = _reference(name)
    obs = {k: np.repeat(v[:, :1], 2, axis=1) for k, v in ref["obs"].items()}
    traj = policy.sample(obs, sampler="ddpm", steps=100, initial_noise=ref["initial_noise"],
                         step_noise=_step_noise(ref))
    assert np.abs(policy.executed_actions(traj)[:, 0] - ref["ddpm_first"]).max() <= ACTION_TOL_PX


def test_batchnorm_encoder_features_match_lerobot(runs):
    """The converted ResNet-18 (BatchNorm, eval mode: lerobot's running statistics) gives lerobot's
    rgb_encoder output per image; its statistics are the source's, not BatchNorm's initial 0 / 1."""
    import torch

    from dpkit.train.checkpoint import load_checkpoint

    policy, _ = load_checkpoint(runs[BN])
    enc = policy.encoder
    norms = [m for m in enc.image_encoder.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 20 and not any(isinstance(m, torch.nn.GroupNorm) for m in enc.image_encoder.modules())
    assert all(float(m.running_var.min()) > 0 for m in norms)
    assert max(float((m.running_mean).abs().max()) for m in norms) > 1e-2
    assert max(float((m.running_var - 1).abs().max()) for m in norms) > 1e-2
    r = _reference(BN)["raw"]
    images = torch.from_numpy(r["obs_image"]).flatten(0, 1)  # b0t0, b0t1, b1t0, b1t1
    with torch.no_grad():
        feats = enc.image_encoder(images * enc.image_scale + enc.image_offset).numpy()
    assert np.abs(feats - r["rgb_encoder_out"]).max() <= 1e-5
    assert np.abs(r["rgb_encoder_out"]).max() > 1e-2  # the features are not all zero


@pytest.fixture(scope="module")
def bundles(runs, tmp_path_factory) -> dict[str, Path]:
    from dpkit.export.writer import export_bundle

    root = tmp_path_factory.mktemp("converted_more_bundles")
    for name, run in runs.items():
        export_bundle(run, root / name, ddim_steps=(10,), data=str(root / "no_dataset"), log=lambda _m: None)
    return {name: root / name for name in runs}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ort", "cpp"])
@pytest.mark.parametrize("name", FIXTURES)
def test_exported_bundle_reproduces_lerobot(bundles, name, backend):
    from dpkit.runtime import load_policy

    if backend == "cpp":
        pytest.importorskip("dpkit.runtime._core")
    policy = load_policy(bundles[name], backend=backend)
    _check(policy, name, ddim_action_tol=RUNTIME_DDIM_ACTION_TOL_PX)
    manifest = json.loads((bundles[name] / "policy.json").read_text())
    assert [o["name"] for o in manifest["observations"]] == EXPECTED_OBS[name]
    assert manifest["scheduler"]["default_sampler"] == "ddpm-100"
    assert manifest["source"]["converted_from"]["version"] == LAYOUT[name]


# ---- BatchNorm sources dpkit cannot represent, and broken ones: one line, nothing at --out ---------------

@pytest.fixture(scope="module")
def bn_source(tmp_path_factory) -> Path:
    return _source(BN, tmp_path_factory.mktemp("bn_source") / "src")


def _variant(bn_source: Path, dst: Path, **config) -> Path:
    dst.mkdir()
    for f in bn_source.iterdir():
        (dst / f.name).symlink_to(f)
    cfg = json.loads((bn_source / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("field,value", [
    ("vision_backbone", "resnet34"), ("crop_shape", [84, 80]), ("resize_shape", [88, 88]), ("crop_ratio", 0.9),
    ("use_group_norm", "no"),
])
def test_batchnorm_source_with_an_unsupported_field_is_named(bn_source, tmp_path, capsys, field, value):
    src = _variant(bn_source, tmp_path / "src", **{field: value})
    _refused(capsys, [str(src)], tmp_path / "out", field, json.dumps(value))


def test_batchnorm_weights_under_a_group_norm_config_are_refused(bn_source, tmp_path, capsys):
    src = _variant(bn_source, tmp_path / "src", use_group_norm=True)
    _refused(capsys, [str(src)], tmp_path / "out", "use_group_norm = true", "running_mean")


def test_batchnorm_negative_variance_is_refused(bn_source, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _variant(bn_source, tmp_path / "src")
    tensors = load_file(str(bn_source / "model.safetensors"))
    key = "diffusion.rgb_encoder.0.backbone.5.0.bn2.running_var"
    tensors[key][3] = -0.5
    (src / "model.safetensors").unlink()
    save_file(tensors, str(src / "model.safetensors"))
    _refused(capsys, [str(src)], tmp_path / "out", key, "negative variance")


def test_batchnorm_missing_running_statistics_are_refused(bn_source, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _variant(bn_source, tmp_path / "src")
    tensors = load_file(str(bn_source / "model.safetensors"))
    del tensors["diffusion.rgb_encoder.0.backbone.6.1.bn1.running_mean"]
    (src / "model.safetensors").unlink()
    save_file(tensors, str(src / "model.safetensors"))
    _refused(capsys, [str(src)], tmp_path / "out", "trunk.stages.5.norm1.running_mean")


def test_lerobot033_missing_unnormalize_statistics_are_refused(tmp_path):
    """0.3.3's real buffers, with unnormalize_outputs.* removed (what a save from numpy statistics gives):
    refused, never converted with inf statistics."""
    from safetensors.torch import load_file, save_file

    src = _source(OLD, tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    assert {k for k in tensors if k.startswith(("normalize_", "unnormalize_"))} == {
        f"{p}.buffer_{f}.{s}" for p, f in (("normalize_inputs", "observation_state"),
                                           ("normalize_inputs", "observation_environment_state"),
                                           ("normalize_targets", "action"), ("unnormalize_outputs", "action"))
        for s in ("min", "max")}
    del tensors["unnormalize_outputs.buffer_action.min"], tensors["unnormalize_outputs.buffer_action.max"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(DpkitError, match="no action.min statistics"):
        convert_policy(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- dpkit's own BatchNorm encoder: trains, keeps its statistics, exports -------------------------------

def test_dpkit_trains_and_exports_a_batchnorm_image_policy(tmp_path):
    import torch
    from synthetic import SMALL_TRAIN, make_synthetic_pusht

    from dpkit.runtime import load_policy
    from dpkit.train.checkpoint import load_checkpoint
    from dpkit.train.config import load_config
    from dpkit.train.trainer import train

    store = make_synthetic_pusht(tmp_path / "img.zarr", lengths=[18, 22])
    cfg = load_config("tiny", [*SMALL_TRAIN, f"data.path={store}", "policy.obs_mode=image", "policy.resnet_width=8",
                               "policy.encoder_norm=batch", "train.batch_size=4", "train.steps=2", "data.val_ratio=0"])
    train(cfg, tmp_path / "run", progress=False)
    policy, state = load_checkpoint(tmp_path / "run")  # the EMA copy: buffers copied from the trained model
    assert state["config"]["policy"]["encoder_norm"] == "batch"
    norms = [m for m in policy.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 20 and all(int(m.num_batches_tracked) == 2 for m in norms)
    assert max(float(m.running_mean.abs().max()) for m in norms) > 0  # updated from BatchNorm's initial 0
    assert not policy.training

    from dpkit.export.writer import export_bundle

    export_bundle(tmp_path / "run", tmp_path / "bundle", ddim_steps=(4,), data=str(store), log=lambda _m: None)
    rng = np.random.default_rng(0)
    obs = {"image": rng.random((2, 2, 3, 96, 96), dtype=np.float32),
           "agent_pos": rng.uniform(50, 450, (2, 2, 2)).astype(np.float32)}
    noise = rng.standard_normal((2, cfg.policy.horizon, 2)).astype(np.float32)
    want = load_policy(tmp_path / "run", backend="torch").sample(obs, sampler="ddim", steps=4, initial_noise=noise)
    got = load_policy(tmp_path / "bundle", backend="ort").sample(obs, sampler="ddim", steps=4, initial_noise=noise)
    assert np.abs(got - want).max() <= 1e-4
