"""dpkit-convert against two more fixtures made by lerobot's own code (tests/data/peers/, README.txt in each).

- lerobot_pusht_image_batchnorm: lerobot 0.6.1, one camera, `use_group_norm: false` (the ResNet-18 keeps
  torchvision's BatchNorm; non-trivial running statistics), a separate encoder per camera (tensors under
  `rgb_encoder.0.`), processor-file statistics. Its weights are committed xz-compressed; the tests
  decompress them into tmp_path.
- lerobot033_pusht_keypoints: lerobot 0.3.3, state-only, the older layout with the statistics as buffers
  inside model.safetensors (normalize_inputs.* / normalize_targets.* / unnormalize_outputs.*).

A converted run must reproduce lerobot's outputs, DDPM-100 and DDIM-10, batch 2, in PyTorch; and (slow)
in ONNX Runtime and the C++ runtime after dpkit's own export, by the rule of tests/peer_parity.py (against
dpkit's float64 run of the converted network). The BatchNorm fixture also holds lerobot's own float64
run, which dpkit's float64 run must match far closer than either float32 run does: the strictest check
of the translation.
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
from peer_parity import ACTION_TOL_PX, Case, Float64Runs, LazyBundles, check_case, ddpm_step_noise
from test_convert import _refused

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
    return {"obs": obs, "raw": r, "ddpm_first": r["ddpm100_select_action_first_step"],
            "ddpm": Case("ddpm", 100, r["initial_noise"], ddpm_step_noise(r["ddpm100_step_noise"]),
                         r["ddpm100_trajectory_normalized"], r["ddpm100_actions"]),
            "ddim": Case("ddim", 10, r["initial_noise"], None, r[f"{ddim}trajectory_normalized"],
                         r[f"{ddim}actions"])}


# lerobot's own float64 runs (the BatchNorm fixture): the reference key per sampler
LEROBOT_FLOAT64 = {"ddpm": "ddpm100_trajectory_normalized_float64", "ddim": "trajectory_normalized_float64"}


def _check(policy, name: str, truth: Float64Runs) -> None:
    ref = _reference(name)
    assert next(iter(ref["obs"].values())).shape[0] >= 2
    for sampler in ("ddpm", "ddim"):
        exact = truth.get(name, ref[sampler], ref["obs"])
        if LEROBOT_FLOAT64[sampler] in ref["raw"]:
            # Two float64 runs of one network, which round different constants to float32 first
            # (statistics; the scheduler's scalars: dpkit.sampling takes the spec's correctly rounded float32
            # square roots, diffusers PyTorch's, which can be one ulp off): measured 6.7e-7 apart (DDPM-100;
            # 1.9e-7 while dpkit's PyTorch path still stepped diffusers' schedulers) and 1.1e-6 (DDIM-10),
            # against lerobot's own float32-vs-float64 error of 7.1e-7 and 4.3e-6. 2e-6 normalized (5e-4 px)
            # still tells float64 arithmetic of the same network from anything else (a wrong block: ~1).
            lerobot64 = ref["raw"][LEROBOT_FLOAT64[sampler]]
            assert np.abs(exact - lerobot64).max() <= 2e-6
        check_case(policy, ref["obs"], ref[sampler], exact)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted_more")
    return {n: Path(convert_policy(_source(n, root / "src" / n), root / n)["out"]) for n in FIXTURES}


@pytest.fixture(scope="module")
def truth(runs) -> Float64Runs:
    return Float64Runs(lambda name: runs[name])


@pytest.mark.parametrize("name", FIXTURES)
def test_converted_run_reproduces_lerobot_in_torch(runs, truth, name):
    from dpkit.runtime import load_policy

    policy = load_policy(runs[name], backend="torch")
    assert list(policy.obs_keys) == EXPECTED_OBS[name]
    choice = policy.resolve_sampler()  # both were saved with lerobot's default DDPM, num_inference_steps null
    assert (choice.sampler, choice.num_inference_steps) == ("ddpm", 100)
    _check(policy, name, truth)
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
    traj = ref["ddpm"].sample(policy, obs)
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
def bundles(runs, tmp_path_factory) -> LazyBundles:
    return LazyBundles(runs, tmp_path_factory.mktemp("converted_more_bundles"))


# `make test` runs the runtimes on the BatchNorm image policy (a graph no other test exports); the 0.3.3
# keypoint policy differs only in how its files are read, which PyTorch checks above (`make test-all`).
RUNTIME_PARAMS = [pytest.param(BN), pytest.param(OLD, marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", ["ort", "cpp"])
@pytest.mark.parametrize("name", RUNTIME_PARAMS)
def test_exported_bundle_reproduces_lerobot(bundles, truth, name, backend):
    from dpkit.runtime import load_policy

    if backend == "cpp":
        pytest.importorskip("dpkit.runtime._core")
    policy = load_policy(bundles[name], backend=backend)
    _check(policy, name, truth)
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


# (crop_ratio is no longer here: without resize_shape lerobot ignores it, and the sweep's crop_ratio_0.9 fixture,
# tests/test_convert_lerobot_sweep.py, converts exactly)
@pytest.mark.parametrize("field,value", [
    ("vision_backbone", "resnet34"), ("crop_shape", [84, 80]), ("resize_shape", [88, 88]), ("use_group_norm", "no"),
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
