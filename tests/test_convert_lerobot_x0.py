"""dpkit-convert on a lerobot 0.6.1 policy with `prediction_type: "sample"` (x0-prediction), against lerobot's
own outputs (tests/data/peers/lerobot_keypoints_x0/, made by lerobot's code; README.txt there). The fixture
reuses the weights, statistics, observations and DDPM draws of lerobot_keypoints_ngroups4_ddpm50 (its
config.json differs from that one in prediction_type and num_inference_steps only).

The rule is tests/peer_parity.py's (Case, Float64Runs, check_case), for DDPM-100 and DDIM-10, batch 2: lerobot's
float32 result within 1e-3 px of dpkit's float64 run of the converted network (the conversion), dpkit's float32
result within lerobot's own error plus the rounding margin of it. The fixture also holds lerobot's own float64
run, which dpkit's float64 run must equal to float64 rounding. The fast tests run PyTorch; the slow ones export
a bundle and run ONNX Runtime and the C++ runtime.
"""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpkit.convert.source import convert_policy
from peer_parity import Case, Float64Runs, check_case, ddpm_step_noise

PEERS = Path(__file__).resolve().parent / "data" / "peers"
FIXTURE = PEERS / "lerobot_keypoints_x0"
BASE = PEERS / "lerobot_keypoints_ngroups4_ddpm50"  # the weights, statistics, observations and draws
TAGS = {"ddpm": "x0_ddpm100", "ddim": "x0_ddim10"}
# dpkit's float64 run vs lerobot's (normalized): lerobot's float64 run starts from its float32-normalized
# observations, dpkit's normalizes in float64, so they differ by that rounding carried through the network
FLOAT64_TOL = 2e-6  # measured 4.1e-7 (DDPM-100 and DDIM-10)


def _source(dst: Path) -> Path:
    """The lerobot folder: this fixture's config.json beside the base fixture's processor files and weights."""
    dst.mkdir(parents=True)
    for f in BASE.iterdir():
        if f.name.startswith("policy_"):
            shutil.copy(f, dst / f.name)
    shutil.copy(FIXTURE / "config.json", dst / "config.json")
    (dst / "model.safetensors").write_bytes(lzma.decompress((BASE / "model.safetensors.xz").read_bytes()))
    return dst


@pytest.fixture(scope="module")
def ref() -> dict:
    base, x0 = dict(np.load(BASE / "reference.npz")), dict(np.load(FIXTURE / "reference.npz"))
    obs = {"state": base["obs_state"], "environment_state": base["obs_environment_state"]}
    cases = {}
    for sampler, tag in TAGS.items():
        steps = len(x0[f"{tag}_timesteps"])
        noise = ddpm_step_noise(base["ddpm100_step_noise"]) if sampler == "ddpm" else None  # the same draws
        cases[sampler] = Case(sampler, steps, base["initial_noise"], noise, x0[f"{tag}_trajectory_normalized"],
                              x0[f"{tag}_actions"])
    return {"obs": obs, "cases": cases, "x0": x0, "base": base}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("converted_x0")
    return Path(convert_policy(_source(root / "src"), root / "run")["out"])


@pytest.fixture(scope="module")
def truth(run) -> Float64Runs:
    return Float64Runs(lambda _name: run)


def _check(policy, ref: dict, truth: Float64Runs) -> dict[str, dict[str, float]]:
    out = {}
    for sampler, case in ref["cases"].items():
        exact = truth.get("x0", case, ref["obs"])
        lerobot64 = ref["x0"][f"{TAGS[sampler]}_trajectory_normalized_float64"]
        assert np.abs(exact - lerobot64).max() <= FLOAT64_TOL, sampler
        # not vacuous: the same weights predicting epsilon give another trajectory
        assert np.abs(case.peer_traj - ref["base"][f"{TAGS[sampler][3:]}_trajectory_normalized"]).max() > 1
        out[sampler] = check_case(policy, ref["obs"], case, exact)
    return out


def test_converted_config_records_x0_prediction(run):
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    pol = state["config"]["policy"]
    assert pol["prediction_type"] == "sample"
    assert (pol["default_sampler"], pol["ddpm_steps"]) == ("ddpm", 100)


def test_converted_run_reproduces_lerobot_in_torch(run, ref, truth):
    from dpkit.runtime import load_policy

    policy = load_policy(run, backend="torch")
    assert policy.policy.cfg.prediction_type == "sample"
    _check(policy, ref, truth)


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory) -> Path:
    from dpkit.export.writer import export_bundle

    out = tmp_path_factory.mktemp("x0_bundle") / "bundle"
    export_bundle(run, out, ddim_steps=(10,), data=str(out.parent / "no_dataset"), log=lambda _m: None)
    return out


# slow: the runtimes' x0 step on an exported bundle is checked by tests/test_prediction_type.py in
# `make test`; this conversion's part (the config it records) is checked in PyTorch above.
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ort", "cpp"])
def test_exported_bundle_reproduces_lerobot(bundle, ref, truth, backend):
    from dpkit.runtime import load_policy

    if backend == "cpp":
        pytest.importorskip("dpkit.runtime._core")
    manifest = json.loads((bundle / "policy.json").read_text())
    assert manifest["scheduler"]["prediction_type"] == "sample"
    assert manifest["scheduler"]["default_sampler"] == "ddpm-100"
    _check(load_policy(bundle, backend=backend), ref, truth)
