"""The "cpp" backend (dpkit.runtime._core): parity with the numpy reference loop, errors, threads.

    .venv/bin/pytest tests/test_cpp_runtime.py

Bundles are the session's tiny bundles (tests/conftest.py: random weights, the shipped export path). The
oracle is the "ort" backend, i.e. the bundle's graphs in Python ONNX Runtime driven by
dpkit.runtime.sampling, with identical injected noise.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from dpkit.errors import DpkitError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundles(tiny_bundles) -> dict[str, Path]:
    """The session's exported tiny bundles (tests/conftest.py)."""
    return tiny_bundles


def random_obs(policy, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in policy.info["observations"]:
        full = (batch, policy.n_obs_steps, *shape)
        out[name] = (rng.uniform(0, 1, full) if name == "image" else rng.uniform(50, 450, full)).astype(np.float32)
    return out


@pytest.mark.parametrize("mode", ["lowdim", "image"])
@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 10)])
@pytest.mark.parametrize("batch", [1, 8])
def test_parity_with_reference_loop(bundles, mode, sampler, steps, batch):
    from dpkit.runtime import load_policy

    cpp = load_policy(bundles[mode], backend="cpp", threads=1, max_batch=8)
    ref = load_policy(bundles[mode], backend="ort", threads=1)
    obs = random_obs(cpp, batch, seed=batch)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((batch, cpp.horizon, cpp.action_dim), dtype=np.float32)
    noise = rng.standard_normal((steps, batch, cpp.horizon, cpp.action_dim), dtype=np.float32)
    got = cpp.sample(obs, sampler=sampler, steps=steps, initial_noise=x0, step_noise=noise)
    want = ref.sample(obs, sampler=sampler, steps=steps, initial_noise=x0, step_noise=noise)
    assert got.shape == want.shape == (batch, cpp.horizon, cpp.action_dim)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got).max() > 0.05  # not a degenerate all-zero trajectory
    acts = cpp.predict_action(obs, sampler=sampler, steps=steps, initial_noise=x0, step_noise=noise)
    np.testing.assert_allclose(acts, ref.predict_action(obs, sampler=sampler, steps=steps, initial_noise=x0,
                                                        step_noise=noise), atol=1e-4 * 300, rtol=0)


def test_interface_and_defaults(bundles):
    from dpkit.runtime.cpp_policy import CppPolicy

    p = CppPolicy(bundles["lowdim"], threads=1, max_batch=2, seed=3)
    assert (p.backend, p.obs_mode, p.obs_keys) == ("cpp", "lowdim", ("obs",))
    assert (p.n_obs_steps, p.horizon, p.n_action_steps, p.action_dim) == (2, 16, 8, 2)
    assert p.ort_version.startswith("1.")
    obs = random_obs(p, 2, 0)
    a = p.sample(obs, seed=5)
    np.testing.assert_array_equal(a, p.sample(obs, seed=5))  # seed= restarts the generator
    assert not np.array_equal(p.sample(obs, sampler="ddpm", seed=5), p.sample(obs, sampler="ddpm", seed=6))
    # Non-contiguous float64 input is converted, not rejected.
    obs64 = {"obs": np.asfortranarray(obs["obs"].astype(np.float64))}
    np.testing.assert_allclose(p.sample(obs64, seed=5), a, atol=1e-6)
    assert p.predict_action(obs, steps=10).shape == (2, 8, 2)


@pytest.mark.parametrize("bad,match", [
    ({"obs": np.zeros((1, 3, 20), np.float32)}, r"observation 'obs' has shape \(1, 3, 20\), expected \(B, 2, 20\)"),
    ({"obs": np.zeros((3, 2, 20), np.float32)}, r"batch 3 is outside \[1, max_batch = 2\]"),
    ({"obs": np.full((1, 2, 20), np.nan, np.float32)}, r"observation 'obs' holds NaN at flat index 0"),
    ({"obs": np.full((1, 2, 20), np.inf, np.float32)}, r"holds Inf"),
    ({"state": np.zeros((1, 2, 20), np.float32)}, r"obs keys \['state'\] do not match"),
    ({"obs": np.full((1, 2, 20), "a")}, r"obs\['obs'\] has dtype <U1, expected float32"),
])
def test_bad_observations_are_value_errors(bundles, bad, match):
    from dpkit.runtime.cpp_policy import CppPolicy

    p = CppPolicy(bundles["lowdim"], threads=1, max_batch=2)
    with pytest.raises(ValueError, match=match) as info:
        p.sample(bad)
    assert isinstance(info.value, DpkitError)  # CLIs print it as one line


def test_bad_noise_sampler_and_provider(bundles):
    from dpkit.runtime.cpp_policy import CppPolicy

    p = CppPolicy(bundles["lowdim"], threads=1)
    obs = random_obs(p, 1, 0)
    with pytest.raises(ValueError, match=r"initial_noise has shape \(1, 15, 2\), expected \(1, 16, 2\)"):
        p.sample(obs, initial_noise=np.zeros((1, 15, 2), np.float32))
    with pytest.raises(ValueError, match=r"step_noise has shape \(10, 1, 16, 2\), expected \(100, 1, 16, 2\)"):
        p.sample(obs, sampler="ddpm", steps=100, step_noise=np.zeros((10, 1, 16, 2), np.float32))
    # The right number of floats in the wrong layout is refused too, not silently reinterpreted.
    with pytest.raises(ValueError, match=r"initial_noise has shape \(1, 2, 16\)"):
        p.sample(obs, initial_noise=np.zeros((1, 2, 16), np.float32))
    with pytest.raises(DpkitError, match="ddim-10"):
        p.sample(obs, sampler="ddim", steps=7)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(RuntimeError, match=r'provider "cuda" is not available') as info:
            CppPolicy(bundles["lowdim"], provider="cuda")
        assert isinstance(info.value, DpkitError)
    with pytest.raises(RuntimeError, match="policy.json"):
        CppPolicy(bundles["lowdim"] / "nope")


def test_core_errors_are_dpkit_errors(bundles):
    """_core raises dpkit.errors' own classes, so one `except` clause serves every backend; the builtin bases
    (ValueError, RuntimeError) stay for callers that catch those."""
    from dpkit.errors import InputError, RuntimeFailure
    from dpkit.runtime import _core
    from dpkit.runtime.cpp_policy import CppPolicy

    assert _core.InputError is InputError and _core.Error is RuntimeFailure
    assert issubclass(InputError, ValueError) and issubclass(RuntimeFailure, RuntimeError)
    p = CppPolicy(bundles["lowdim"], threads=1)
    with pytest.raises(InputError, match="ddim-10") as info:
        p._policy.find_sampler("ddim", 7)  # raised in C++ (dpkit::InputError)
    assert type(info.value) is InputError
    with pytest.raises(RuntimeFailure, match="policy.json") as info:
        CppPolicy(bundles["lowdim"] / "nope")  # dpkit::Error from the C++ bundle reader
    assert type(info.value) is RuntimeFailure


def test_tampered_bundle_is_refused(bundles, tmp_path):
    import shutil

    from dpkit.runtime.cpp_policy import CppPolicy

    b = tmp_path / "b"
    shutil.copytree(bundles["lowdim"], b)
    data = bytearray((b / "denoiser.onnx").read_bytes())
    data[-3] ^= 0xFF
    (b / "denoiser.onnx").write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"models.denoiser.sha256 does not match denoiser.onnx"):
        CppPolicy(b)


def _in_threads(work, n: int) -> list:
    """work(0) .. work(n - 1), each on its own thread, started together; their results in order."""
    results: list = [None] * n

    def run(i: int) -> None:
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_one_policy_per_thread(bundles):
    from dpkit.runtime.cpp_policy import CppPolicy

    obs = random_obs(CppPolicy(bundles["image"], threads=1), 1, 2)
    want = [CppPolicy(bundles["image"], threads=1).sample(obs, sampler="ddpm", steps=10, seed=s) for s in range(4)]

    def work(s: int) -> np.ndarray:
        return CppPolicy(bundles["image"], threads=1).sample(obs, sampler="ddpm", steps=10, seed=s)

    for got, w in zip(_in_threads(work, 4), want):
        np.testing.assert_array_equal(got, w)


def test_one_policy_shared_by_threads_is_serialized(bundles):
    """Sharing one CppPolicy between threads is safe (a lock inside the module): same results as in turn."""
    from dpkit.runtime.cpp_policy import CppPolicy

    pol = CppPolicy(bundles["lowdim"], threads=1, max_batch=4)
    obs = [random_obs(pol, 4, s) for s in range(6)]
    want = [pol.sample(o, sampler="ddpm", steps=100, seed=s) for s, o in enumerate(obs)]

    def work(s: int) -> list[np.ndarray]:
        return [pol.sample(obs[s], sampler="ddpm", steps=100, seed=s) for _ in range(3)]

    for got, w in zip(_in_threads(work, 6), want):
        for g in got:
            np.testing.assert_array_equal(g, w)


def test_last_timing_and_default_sampler_rule(bundles):
    from dpkit.runtime import load_policy

    cpp = load_policy(bundles["lowdim"], backend="cpp", threads=1)
    ort = load_policy(bundles["lowdim"], backend="ort", threads=1)
    obs = random_obs(cpp, 1, 0)
    # steps without a sampler: the default sampler's kind (DDIM) on every backend, so ddim-100, not ddpm-100.
    np.testing.assert_allclose(cpp.sample(obs, steps=100, seed=0), ort.sample(obs, sampler="ddim", steps=100, seed=0),
                               atol=1e-4)
    t = cpp.last_timing
    assert t["steps"] == 100
    assert t["encoder_ms"] > 0 and t["denoiser_ms"] > 0 and t["loop_ms"] >= 0
    assert t["total_ms"] == pytest.approx(t["encoder_ms"] + t["denoiser_ms"] + t["loop_ms"])
    # The typed handle of the C++ API: the default sampler, its name reported in info.
    default = cpp._policy.find_sampler()
    assert default.name == cpp.info["default_sampler"] == "ddim-10"
    assert (default.sampler, default.num_inference_steps, default.uses_step_noise) == ("ddim", 10, False)
    assert cpp._policy.find_sampler("ddpm").name == "ddpm-100" and cpp._policy.find_sampler("ddpm").uses_step_noise
    other = load_policy(bundles["lowdim"], backend="cpp", threads=1)
    with pytest.raises(ValueError, match="made by another Policy") as info:
        cpp._policy.sample([obs["obs"]], other._policy.find_sampler())
    assert isinstance(info.value, DpkitError)
