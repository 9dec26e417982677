"""load_policy's parameters under the C++ runtime's names (issue 19), the older Python spellings kept, and the
backend chosen from what the path is."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dpkit.errors import DpkitError, InputError
from dpkit.runtime import backend_for, load_policy
from dpkit.runtime.backend import resolve_provider

GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "bundle"


def _has_cpp() -> bool:
    try:
        import dpkit.runtime.cpp_policy  # noqa: F401
    except ImportError:
        return False
    return True


def test_resolve_provider():
    assert resolve_provider(None, None) is None
    assert resolve_provider("cuda", None) == "cuda"
    assert resolve_provider(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert resolve_provider(None, [("TensorrtExecutionProvider", {}), "CUDAExecutionProvider"]) == "tensorrt"
    assert resolve_provider("cpu", ["CPUExecutionProvider"]) == "cpu"
    for provider, providers, message in (("npu", None, "provider must be one of"),
                                         (["cpu"], None, "provider must be one of"),
                                         ("cpu", ["CUDAExecutionProvider"], "disagree"),
                                         (None, ["OpenVINOExecutionProvider"], "is not one of"),
                                         (None, 5, "providers must be a list")):
        with pytest.raises(InputError, match=message):
            resolve_provider(provider, providers)


def test_backend_from_the_path(tmp_path, tiny_runs, monkeypatch):
    assert backend_for(GOLDEN) == ("cpp" if _has_cpp() else "ort")
    assert backend_for(tiny_runs["lowdim"]) == "torch"  # a training run folder
    with pytest.raises(DpkitError, match="does not exist"):
        backend_for(tmp_path / "nothing")
    with pytest.raises(DpkitError, match="does not exist"):
        load_policy(tmp_path / "nothing")
    # Without the compiled module a bundle would go to ort, whose bundle reader is the compiled one too: one
    # line saying how to build it.
    import dpkit.runtime

    monkeypatch.setitem(sys.modules, "dpkit.runtime._core", None)
    monkeypatch.delitem(sys.modules, "dpkit.runtime.cpp_policy", raising=False)
    monkeypatch.delattr(dpkit.runtime, "_core", raising=False)
    assert backend_for(GOLDEN) == "ort"
    with pytest.raises(DpkitError, match=r"dpkit\.runtime\._core\) is not available .*pip install \."):
        load_policy(GOLDEN, threads=1)


def test_load_policy_without_backend(tiny_runs, tiny_bundles):
    policy = load_policy(tiny_bundles["lowdim"], threads=1)
    assert policy.backend == ("cpp" if _has_cpp() else "ort")
    torch_policy = load_policy(tiny_runs["lowdim"], threads=1)
    assert torch_policy.backend == "torch"
    obs = {"obs": np.zeros((1, policy.n_obs_steps, *policy.observations[0]["shape"]), np.float32)}
    np.testing.assert_allclose(policy.sample(obs, sampler="ddim", steps=10, seed=0),
                               load_policy(tiny_bundles["lowdim"], backend="ort", threads=1)
                               .sample(obs, sampler="ddim", steps=10, seed=0), atol=1e-4)
    # provider= is torch's device
    assert load_policy(tiny_runs["lowdim"], provider="cpu", threads=1).backend == "torch"
    with pytest.raises(DpkitError, match="disagree"):
        load_policy(tiny_runs["lowdim"], provider="cpu", device="cuda")


def test_ort_takes_the_cpp_names_and_keeps_its_own():
    ort = load_policy(GOLDEN, backend="ort", provider="cpu", allow_spinning=False, threads=1)
    assert ort.provider == "cpu" and ort.providers == ["CPUExecutionProvider"] and ort.threads.spin is False
    old = load_policy(GOLDEN, backend="ort", providers=["CPUExecutionProvider"], spin=True, threads=1)
    assert old.provider == "cpu" and old.threads.spin is True
    with pytest.raises(InputError, match="disagree"):
        load_policy(GOLDEN, backend="ort", spin=True, allow_spinning=False)
    with pytest.raises(InputError, match="disagree"):
        load_policy(GOLDEN, backend="ort", provider="cpu", providers=["CUDAExecutionProvider"])
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        # like C++: a named provider that is not there is an error, not a silent fallback to CPU
        with pytest.raises(DpkitError, match="not available"):
            load_policy(GOLDEN, backend="ort", provider="cuda", threads=1)


@pytest.mark.skipif(not _has_cpp(), reason="the C++ module is not built")
def test_cpp_takes_the_older_python_names():
    cpp = load_policy(GOLDEN, backend="cpp", providers=["CPUExecutionProvider"], spin=False, threads=1, max_batch=1)
    assert cpp.provider == "cpu" and cpp.threads.spin is False
    assert cpp.max_batch == 1
    with pytest.raises(InputError, match="disagree"):
        load_policy(GOLDEN, backend="cpp", provider="cuda", providers=["CPUExecutionProvider"], max_batch=1)
    # Python's default max_batch stays 8 (the pybind module's; C++ PolicyParams says 1): see runtime/__init__.py
    assert load_policy(GOLDEN, backend="cpp", threads=1).max_batch == 8
