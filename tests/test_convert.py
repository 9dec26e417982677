"""dpkit-convert against outputs made by the peers' own code (../shared/fixtures/peers/, see each README.txt).

Each fixture holds a policy saved by lerobot 0.6.1 or the original diffusion_policy and `reference.npz`:
observations, the injected initial noise, the 99 per-step DDPM draws ([i] used at t = 99 - i) and the
peer's own trajectories and actions. A converted run must reproduce them, DDPM-100 and DDIM-10, batch >= 2,
in PyTorch and (slow) in ONNX Runtime and the C++ runtime after dpkit's own export, by the rule of
tests/peer_parity.py: the peer's float32 result within 1e-3 px of dpkit's float64 run of the converted
network, and dpkit's float32 result within the peer's own float32 error plus a measured rounding margin.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import refused

from dpkit.convert.cli import main as convert_main
from dpkit.convert.source import convert_policy
from dpkit.errors import DpkitError
from peer_parity import Case, Float64Runs, LazyBundles, check_case, ddpm_step_noise

PEERS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "peers"
FIXTURES = {
    "original_pusht_lowdim_tiny": "latest.ckpt",
    "lerobot_pusht_keypoints": "",
    "lerobot_pusht_image_seed1": "",
}
EXPECTED_OBS = {"original_pusht_lowdim_tiny": ["obs"], "lerobot_pusht_keypoints": ["state", "environment_state"],
                "lerobot_pusht_image_seed1": ["state", "image"]}


def _fixture(name: str) -> Path:
    path = PEERS / name
    if not path.is_dir():
        pytest.skip(f"peer fixture {path} not found (../shared is absent)")
    return path


def _reference(name: str) -> dict:
    """The fixture's observations and its DDPM-100 and DDIM-10 cases under one naming (the peers' files differ)."""
    r = dict(np.load(_fixture(name) / "reference.npz"))
    if name.startswith("original"):
        return {"obs": {"obs": r["obs"]},
                "ddpm": Case("ddpm", 100, r["ddpm_initial_noise"], ddpm_step_noise(r["ddpm_step_noise"]),
                             r["ddpm_normalized_trajectory"], r["ddpm_action"]),
                "ddim": Case("ddim", 10, r["ddim10_initial_noise"], None, r["ddim10_normalized_trajectory"],
                             r["ddim10_action"])}
    obs = {k[len("obs_"):]: r[k] for k in ("obs_state", "obs_environment_state", "obs_image") if k in r}
    ddim = "ddim10_" if "ddim10_trajectory_normalized" in r else ""
    return {"obs": obs,
            "ddpm": Case("ddpm", 100, r["initial_noise"], ddpm_step_noise(r["ddpm100_step_noise"]),
                         r["ddpm100_trajectory_normalized"], r["ddpm100_actions"]),
            "ddim": Case("ddim", 10, r["initial_noise"], None, r[f"{ddim}trajectory_normalized"],
                         r[f"{ddim}actions"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Each fixture converted once per module (skipped one by one where ../shared lacks it)."""
    out = {}
    root = tmp_path_factory.mktemp("converted")
    for name, file in FIXTURES.items():
        if (PEERS / name).is_dir():
            out[name] = Path(convert_policy(PEERS / name / file, root / name)["out"])
    return out


@pytest.fixture(scope="module")
def truth(runs) -> Float64Runs:
    return Float64Runs(lambda name: runs[name])


def _check_policy(policy, name: str, truth: Float64Runs) -> None:
    ref = _reference(name)
    assert next(iter(ref["obs"].values())).shape[0] >= 2
    for sampler in ("ddpm", "ddim"):
        check_case(policy, ref["obs"], ref[sampler], truth.get(name, ref[sampler], ref["obs"]))


@pytest.mark.parametrize("name", list(FIXTURES))
def test_converted_run_reproduces_the_peer_in_torch(runs, truth, name):
    from dpkit.runtime import load_policy

    _fixture(name)
    policy = load_policy(runs[name], backend="torch")
    assert list(policy.obs_keys) == EXPECTED_OBS[name]
    choice = policy.resolve_sampler()  # every fixture is configured as DDPM-100, the peer's default
    assert (choice.sampler, choice.num_inference_steps) == ("ddpm", 100)
    _check_policy(policy, name, truth)
    state = json.loads(next((runs[name] / "checkpoints").glob("step_*/state.json")).read_text())
    src = state["source"]
    assert src["format"] == ("diffusion_policy" if name.startswith("original") else "lerobot")
    assert len(src["sha256"]) == 64 and Path(src["path"]).exists()
    if name.startswith("original"):
        assert src["weights"] == "ema_model"  # eval.py's choice when training.use_ema


@pytest.fixture(scope="module")
def bundles(runs, tmp_path_factory) -> LazyBundles:
    return LazyBundles(runs, tmp_path_factory.mktemp("converted_bundles"))


# The runtimes' parity on a converted policy is checked by `make test` where the exported graphs are ones no
# other test exports: the lerobot image encoder (per-channel mean/std, spatial softmax without temperature).
# The low-dim fixtures export the same U-Net graph as every dpkit bundle (tests/test_pipeline.py,
# tests/test_cpp_runtime.py); their conversion is what differs, and PyTorch checks it above. They run with
# `make test-all`.
RUNTIME_IN_MAKE_TEST = ("lerobot_pusht_image_seed1",)
RUNTIME_PARAMS = [pytest.param(n, marks=() if n in RUNTIME_IN_MAKE_TEST else pytest.mark.slow) for n in FIXTURES]


@pytest.mark.parametrize("backend", ["ort", "cpp"])
@pytest.mark.parametrize("name", RUNTIME_PARAMS)
def test_exported_bundle_reproduces_the_peer(bundles, truth, name, backend):
    from dpkit.runtime import load_policy

    _fixture(name)
    policy = load_policy(bundles[name], backend=backend)
    _check_policy(policy, name, truth)
    manifest = json.loads((bundles[name] / "policy.json").read_text())
    assert [o["name"] for o in manifest["observations"]] == EXPECTED_OBS[name]
    assert manifest["scheduler"]["default_sampler"] == "ddpm-100"
    origin = manifest["source"]["converted_from"]
    assert origin["format"] == ("diffusion_policy" if name.startswith("original") else "lerobot")
    assert len(origin["sha256"]) == 64


def test_ort_and_cpp_sample_identically(bundles):
    """One step description in two languages: the same graphs and noise give the same bits in both."""
    from dpkit.runtime import load_policy

    name = "lerobot_pusht_image_seed1"  # both graphs non-trivial, and the largest diffs to the peer
    _fixture(name)
    ref = _reference(name)
    ort_policy, cpp_policy = (load_policy(bundles[name], backend=b) for b in ("ort", "cpp"))
    for sampler in ("ddpm", "ddim"):
        a, b = (ref[sampler].sample(p, ref["obs"]) for p in (ort_policy, cpp_policy))
        np.testing.assert_array_equal(a, b, err_msg=sampler)


def test_original_ckpt_no_ema_takes_the_trained_weights(tmp_path):
    ckpt = _fixture("original_pusht_lowdim_tiny") / "latest.ckpt"
    summary = convert_policy(ckpt, tmp_path / "raw", ema=False)
    assert summary["source"]["weights"] == "model"


# ---- bad sources: one line, exit 1, nothing at --out -------------------------------------------------

def _refused(capsys, argv: list[str], out: Path, *needles: str) -> str:
    err = refused(convert_main, capsys, [*argv, "--out", str(out), "--no-progress"], *needles)
    assert not out.exists()
    return err


def _copy(name: str, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """A writable copy of a fixture (big files linked, not copied)."""
    src = _fixture(name)
    dst.mkdir()
    for f in src.iterdir():
        if f.name in skip or f.name == "reference.npz":
            continue
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def test_neither_format(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    _refused(capsys, [str(tmp_path / "src")], tmp_path / "out", "neither a lerobot")


def test_lerobot_missing_weights(tmp_path, capsys):
    src = _copy("lerobot_pusht_keypoints", tmp_path / "src", skip=("model.safetensors",))
    _refused(capsys, [str(src)], tmp_path / "out", "model.safetensors is missing")


def test_lerobot_truncated_weights(tmp_path, capsys):
    src = _copy("lerobot_pusht_keypoints", tmp_path / "src", skip=("model.safetensors",))
    data = (PEERS / "lerobot_pusht_keypoints" / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    _refused(capsys, [str(src)], tmp_path / "out", "corrupt or truncated")


def test_lerobot_missing_statistics_file(tmp_path, capsys):
    src = _copy("lerobot_pusht_keypoints", tmp_path / "src",
                skip=("policy_postprocessor_step_0_unnormalizer_processor.safetensors",))
    _refused(capsys, [str(src)], tmp_path / "out", "unnormalizer_processor.safetensors is missing")


@pytest.mark.parametrize("field,value", [
    ("use_group_norm", False), ("noise_scheduler_type", "EulerDiscrete"), ("prediction_type", "v_prediction"),
    ("vision_backbone", "resnet34"), ("use_film_scale_modulation", False), ("crop_shape", [84, 80]),
])
def test_lerobot_unsupported_field_is_named(tmp_path, capsys, field, value):
    src = _copy("lerobot_pusht_image_seed1", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, [str(src)], tmp_path / "out", field, json.dumps(value))


def test_lerobot_two_cameras_refused(tmp_path, capsys):
    src = _copy("lerobot_pusht_image_seed1", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["input_features"]["observation.images.wrist"] = {"type": "VISUAL", "shape": [3, 96, 96]}
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, [str(src)], tmp_path / "out", "input_features (cameras)", "one camera")


def test_lerobot_mismatched_tensor_shapes(tmp_path, capsys):
    src = _copy("lerobot_pusht_keypoints", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["down_dims"] = [64, 128, 512]
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, [str(src)], tmp_path / "out", "has shape", "the config implies")


def test_lerobot_non_finite_statistics(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _copy("lerobot_pusht_keypoints", tmp_path / "src")
    name = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    table = load_file(str(PEERS / "lerobot_pusht_keypoints" / name))
    table["action.max"][0] = float("inf")
    (src / name).unlink()
    save_file(table, str(src / name))
    _refused(capsys, [str(src)], tmp_path / "out", "action.max", "not finite")


def test_original_truncated_ckpt(tmp_path, capsys):
    data = (_fixture("original_pusht_lowdim_tiny") / "latest.ckpt").read_bytes()
    (tmp_path / "latest.ckpt").write_bytes(data[: len(data) * 2 // 3])
    _refused(capsys, [str(tmp_path / "latest.ckpt")], tmp_path / "out", "latest.ckpt")


def _torch_zip(path: Path, pickle_bytes: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickle_with_a_foreign_global_executes_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"cfg": {}, "state_dicts": {"model": _RunsACommand(marker)}}, protocol=2)
    _torch_zip(tmp_path / "evil.ckpt", payload)
    err = _refused(capsys, [str(tmp_path / "evil.ckpt")], tmp_path / "out", "system", "nothing from the file was executed")
    assert "posix.system" in err or "os.system" in err
    assert not marker.exists()


def test_unpickler_rejects_builtins_eval(tmp_path):
    from dpkit.convert.unpickle import load_torch_zip

    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=4).dump(eval)  # a bare reference to builtins.eval
    _torch_zip(tmp_path / "x.ckpt", buf.getvalue())
    with pytest.raises(DpkitError, match="builtins.eval"):
        load_torch_zip(tmp_path / "x.ckpt")


def test_original_unsupported_policy_is_named(tmp_path, capsys, monkeypatch):
    import dpkit.convert.original as original

    real = original.load_torch_zip

    def patched(path):
        payload = real(path)
        payload["cfg"]["policy"]["_target_"] = "diffusion_policy.policy.diffusion_transformer_lowdim_policy.X"
        return payload

    monkeypatch.setattr(original, "load_torch_zip", patched)
    ckpt = _fixture("original_pusht_lowdim_tiny") / "latest.ckpt"
    _refused(capsys, [str(ckpt)], tmp_path / "out", "cfg.policy._target_", "diffusion_transformer_lowdim_policy")


def test_out_is_kept_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        convert_main([str(_fixture("original_pusht_lowdim_tiny") / "latest.ckpt"), "--out", str(out), "--no-progress"])
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


# ---- evaluation builds each converted policy's observations from gym-pusht -----------------------------

def test_pusht_builds_lerobot_keypoint_observations():
    pytest.importorskip("gym_pusht")
    import gymnasium as gym

    from dpkit.eval import pusht

    env = pusht.make_env("lowdim")
    raw = pusht.reset_legacy(env, pusht.LEGACY_TEST_SEED + 3)
    obs = pusht.observe(env, "lowdim", raw, ("state", "environment_state", "obs"))
    # gym-pusht's own environment_state observation of the same start state
    ref_env = gym.make(pusht.ENV_ID, obs_type="environment_state_agent_pos", disable_env_checker=True)
    ref, _ = ref_env.reset(options={"reset_to_state": pusht.legacy_start_state(pusht.LEGACY_TEST_SEED + 3)})
    np.testing.assert_allclose(obs["environment_state"], ref["environment_state"], atol=1e-3)
    np.testing.assert_allclose(obs["state"], ref["agent_pos"], atol=1e-3)
    assert obs["obs"].shape == (20,) and np.allclose(obs["obs"][18:], obs["state"])
    with pytest.raises(DpkitError, match="cannot give observation 'image'"):
        pusht.observe(env, "lowdim", raw, ("image",))


@pytest.mark.parametrize("name", ["lerobot_pusht_keypoints", "original_pusht_lowdim_tiny", "lerobot_pusht_image_seed1"])
def test_converted_policy_is_evaluated_in_gym_pusht(runs, name):
    pytest.importorskip("gym_pusht")
    from dpkit.eval.evaluate import evaluate_policy
    from dpkit.runtime import load_policy

    _fixture(name)
    report = evaluate_policy(load_policy(runs[name], backend="torch"), episodes=2, max_steps=16, progress=False)
    assert report["n_episodes"] == 2 and [e["steps"] for e in report["episodes"]] == [16, 16]
    assert 0.0 <= report["score"] <= 1.0


def test_lerobot_older_layout_statistics_in_model_safetensors(tmp_path, truth):
    """lerobot <= 0.3 kept the statistics as buffers in model.safetensors (`normalize_inputs.buffer_<feature>.*`,
    `normalize_targets.*`, `unnormalize_outputs.*`, names read from lerobot 0.3.3's code); rebuilt here from the
    0.6.1 fixture, it must sample the same trajectories."""
    from safetensors.torch import load_file, save_file

    from dpkit.runtime import load_policy

    name = "lerobot_pusht_keypoints"
    src = _copy(name, tmp_path / "old", skip=tuple(p.name for p in _fixture(name).glob("policy_*")))
    tensors = load_file(str(PEERS / name / "model.safetensors"))
    stats = load_file(str(PEERS / name / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    for feat in ("observation.state", "observation.environment_state"):
        for stat in ("min", "max"):
            tensors[f"normalize_inputs.buffer_{feat.replace('.', '_')}.{stat}"] = stats[f"{feat}.{stat}"]
    for prefix in ("normalize_targets", "unnormalize_outputs"):
        for stat in ("min", "max"):
            tensors[f"{prefix}.buffer_action.{stat}"] = stats[f"action.{stat}"].clone()
    (src / "model.safetensors").unlink()
    save_file(tensors, str(src / "model.safetensors"))
    summary = convert_policy(src, tmp_path / "run")
    assert summary["source"]["version"].startswith("model.safetensors buffers")
    _check_policy(load_policy(tmp_path / "run", backend="torch"), name, truth)

    # 0.3.3 can save a folder without unnormalize_outputs.*: refused, never inf statistics
    del tensors["unnormalize_outputs.buffer_action.min"], tensors["unnormalize_outputs.buffer_action.max"]
    (src / "model.safetensors").unlink()
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(DpkitError, match="no action.min statistics"):
        convert_policy(src, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_lerobot_separate_rgb_encoder_per_camera(tmp_path, truth):
    """use_separate_rgb_encoder_per_camera with one camera: the encoder's tensors are under rgb_encoder.0."""
    from safetensors.torch import load_file, save_file

    from dpkit.runtime import load_policy

    name = "lerobot_pusht_image_seed1"
    src = _copy(name, tmp_path / "sep", skip=("model.safetensors",))
    tensors = {k.replace("diffusion.rgb_encoder.", "diffusion.rgb_encoder.0."): v
               for k, v in load_file(str(PEERS / name / "model.safetensors")).items()}
    save_file(tensors, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    with pytest.raises(DpkitError, match="rgb_encoder.0."):  # the shared-encoder config names no index
        convert_policy(src, tmp_path / "bad")
    cfg["use_separate_rgb_encoder_per_camera"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    convert_policy(src, tmp_path / "run")
    _check_policy(load_policy(tmp_path / "run", backend="torch"), name, truth)


def test_observation_layout_config_is_validated_and_defaults_unchanged():
    import torch

    from dpkit.train.config import Config, load_config
    from dpkit.train.policy import OBS_SPECS, ObsEncoder, obs_specs

    for bad, msg in [({"obs_keys": ["state", "image"], "obs_dims": [2]}, "an image policy"),
                     ({"obs_mode": "image", "obs_keys": ["state"], "obs_dims": [2]}, "an image policy"),
                     ({"obs_keys": ["state", "environment_state"], "obs_dims": [2]}, "one size per vector"),
                     ({"obs_keys": ["state", "state"], "obs_dims": [2, 2]}, "repeated"),
                     ({"obs_mode": "image", "image_std": [0.2, 0.0, 0.2]}, "image_std")]:
        with pytest.raises(DpkitError, match=msg):
            Config.from_dict({"policy": {"obs_mode": "lowdim", **bad}})
    for mode in ("image", "lowdim"):
        cfg = load_config("tiny", [f"policy.obs_mode={mode}"]).policy
        assert obs_specs(cfg) == OBS_SPECS[mode]
    # dpkit's own image policies keep mapping [0, 1] to [-1, 1] exactly (x * 2 - 1)
    from dpkit.train.normalizer import Normalizer

    cfg = load_config("tiny", ["policy.obs_mode=image"]).policy
    enc = ObsEncoder(cfg, Normalizer.fit({"agent_pos": np.random.rand(4, 2), "action": np.random.rand(4, 2)}))
    assert torch.equal(enc.image_scale.flatten(), torch.full((3,), 2.0))
    assert torch.equal(enc.image_offset.flatten(), torch.full((3,), -1.0))


def test_lerobot_ddim_config_sets_the_default_sampler(tmp_path):
    from dpkit.runtime import load_policy

    src = _copy("lerobot_pusht_keypoints", tmp_path / "ddim")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(noise_scheduler_type="DDIM", num_inference_steps=10)
    (src / "config.json").write_text(json.dumps(cfg))
    convert_policy(src, tmp_path / "run")
    choice = load_policy(tmp_path / "run", backend="torch").resolve_sampler()
    assert (choice.sampler, choice.num_inference_steps) == ("ddim", 10)


def test_original_ddim_workspace_defaults_to_its_ddim(tmp_path, monkeypatch):
    """An original DDIM workspace's scheduler (train_diffusion_unet_ddim_lowdim_workspace.yaml) becomes the
    default sampler; the fixture's ddim10_* references were made with exactly that scheduler."""
    import dpkit.convert.original as original
    from dpkit.runtime import load_policy

    real = original.load_torch_zip

    def as_ddim_workspace(path):
        payload = real(path)
        pol = payload["cfg"]["policy"]
        pol["noise_scheduler"] = {"_target_": original.DDIM, "num_train_timesteps": 100, "beta_start": 0.0001,
                                  "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True,
                                  "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon"}
        pol["num_inference_steps"] = 10
        return payload

    monkeypatch.setattr(original, "load_torch_zip", as_ddim_workspace)
    name = "original_pusht_lowdim_tiny"
    convert_policy(_fixture(name) / "latest.ckpt", tmp_path / "run")
    policy = load_policy(tmp_path / "run", backend="torch")
    choice = policy.resolve_sampler()
    assert (choice.sampler, choice.num_inference_steps) == ("ddim", 10)
    # no sampler named: the default is exactly the DDIM-10 the parity tests check against the fixture
    init = _reference(name)["ddim"].initial_noise
    default = policy.sample(_reference(name)["obs"], initial_noise=init)
    np.testing.assert_array_equal(default, policy.sample(_reference(name)["obs"], sampler="ddim", steps=10,
                                                         initial_noise=init))


@pytest.mark.parametrize("pred", ["sample", "v_prediction"])
def test_original_prediction_type_is_carried_or_refused(tmp_path, capsys, monkeypatch, pred):
    """x0-prediction (diffusers' "sample", which the original's policies train and sample with) is recorded;
    another prediction type is refused by name."""
    import dpkit.convert.original as original

    real = original.load_torch_zip

    def with_prediction_type(path):
        payload = real(path)
        payload["cfg"]["policy"]["noise_scheduler"]["prediction_type"] = pred
        return payload

    monkeypatch.setattr(original, "load_torch_zip", with_prediction_type)
    ckpt = _fixture("original_pusht_lowdim_tiny") / "latest.ckpt"
    if pred != "sample":
        _refused(capsys, [str(ckpt)], tmp_path / "out", "cfg.policy.noise_scheduler.prediction_type", pred)
        return
    run = Path(convert_policy(ckpt, tmp_path / "run")["out"])
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["config"]["policy"]["prediction_type"] == "sample"


def test_cli_json_summary_and_ckpt_folder(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "latest.ckpt").symlink_to(_fixture("original_pusht_lowdim_tiny") / "latest.ckpt")
    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path), "--out", str(tmp_path / "run"), "--no-ema", "--json", str(tmp_path / "s.json"),
                      "--no-progress"])
    assert e.value.code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["source"]["weights"] == "model" and summary["step"] == 10 and summary["obs_mode"] == "lowdim"
    assert "dpkit-convert: diffusion_policy" in capsys.readouterr().out


def test_force_replaces_only_a_run_folder(tmp_path, capsys):
    ckpt = str(_fixture("original_pusht_lowdim_tiny") / "latest.ckpt")
    data = tmp_path / "data"
    data.mkdir()
    (data / "episodes.zarr").write_text("x")
    with pytest.raises(SystemExit):
        convert_main([ckpt, "--out", str(data), "--force", "--no-progress"])
    assert "replaces only a dpkit run folder" in capsys.readouterr().err and (data / "episodes.zarr").exists()
    for _ in range(2):  # a second conversion over the first run is allowed with --force
        with pytest.raises(SystemExit) as e:
            convert_main([ckpt, "--out", str(tmp_path / "run"), "--force", "--no-progress"])
        assert e.value.code == 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()] == ["step_000010"]
