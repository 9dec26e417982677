"""The example controller (cpp/examples/controller.cpp) matches the Python "cpp" backend on a stream.

    make cpp-build && .venv/bin/pytest tests/test_cpp_controller.py

Needs the built controller (build/cpp/cpp/examples/dpkit_controller, or $DPKIT_CONTROLLER).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTROLLER = Path(os.environ.get("DPKIT_CONTROLLER", ROOT / "build/cpp/cpp/examples/dpkit_controller"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def controller() -> Path:
    if not CONTROLLER.exists():
        pytest.skip(f"example controller not built at {CONTROLLER} (run `make cpp-build`)")
    return CONTROLLER


def windows(inputs: dict[str, np.ndarray], lengths: list[int], to: int, ta: int):
    """The controller's observation windows, rebuilt independently: last To steps, first step repeated."""
    start = 0
    for n in lengths:
        for t in range(0, n, ta):
            idx = [start + max(0, t - to + 1 + j) for j in range(to)]
            yield {k: v[idx][None] for k, v in inputs.items()}
        start += n


def run_and_compare(controller: Path, bundle: Path, inputs, lengths, obs_mode: str, tmp_path: Path) -> str:
    from dpkit.runtime.cpp_policy import CppPolicy, onnxruntime_library

    rec = _load(ROOT / "cpp/examples/record_observations.py")
    stream = tmp_path / "obs.stream"
    rec.write_stream(stream, obs_mode, inputs, lengths)
    dump = tmp_path / "actions.f32"
    res = subprocess.run([str(controller), str(bundle), str(stream), "--fast", "--sampler", "ddpm", "--steps", "10",
                          "--threads", "1", "--seed", "5", "--dump", str(dump), "--ort-library", onnxruntime_library()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "p50" in res.stdout and "deadline" in res.stdout
    policy = CppPolicy(bundle, threads=1, seed=5, max_batch=1)
    want = np.stack([policy.predict_action(w, sampler="ddpm", steps=10)[0]
                     for w in windows(inputs, lengths, policy.n_obs_steps, policy.n_action_steps)])
    got = np.fromfile(dump, dtype="<f4").reshape(want.shape)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    return res.stdout


def test_controller_matches_python_backend(controller, tiny_bundles, tmp_path):
    bundle = tiny_bundles["lowdim"]
    lengths = [13, 30]
    obs = np.random.default_rng(0).uniform(50, 450, (sum(lengths), 20)).astype(np.float32)
    out = run_and_compare(controller, bundle, {"obs": obs}, lengths, "lowdim", tmp_path)
    assert "6 chunks over 2 episodes" in out  # ceil(13/8) + ceil(30/8)


def test_controller_rejects_a_bad_stream(controller, tmp_path):
    bad = tmp_path / "bad.stream"
    bad.write_text('{"format": "other"}\n')
    res = subprocess.run([str(controller), str(ROOT), str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "dpkit-obs-stream" in res.stderr


@pytest.mark.dataset
def test_controller_on_recorded_pusht(controller, real_dataset, tiny_bundles, tmp_path):
    rec = _load(ROOT / "cpp/examples/record_observations.py")
    inputs, lengths = rec.read_pusht(real_dataset, 2, "lowdim")
    run_and_compare(controller, tiny_bundles["lowdim"], inputs, lengths, "lowdim", tmp_path)
