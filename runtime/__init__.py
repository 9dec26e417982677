"""Sample a trained policy from Python: one interface over PyTorch, ONNX Runtime and the C++ runtime.

    from dpkit.runtime import load_policy
    policy = load_policy("bundles/tiny")                         # a bundle: "cpp"
    policy = load_policy("runs/tiny")                            # a run folder or checkpoint: "torch"
    policy = load_policy("bundles/tiny", backend="ort", provider="cpu", allow_spinning=False, max_batch=...)
    traj = policy.sample(obs, sampler="ddim", steps=10, seed=0)  # (B, H, A) normalized
    actions = policy.predict_action(obs)                         # (B, Ta, A) environment units

`obs` is a dict of numpy arrays named as in the bundle's policy.json ("image" + "agent_pos", or "obs"),
each (B, To, ...). Every backend has `sample`, `predict_action` and the attributes `n_obs_steps`,
`horizon`, `n_action_steps`, `action_dim`, `obs_mode`, `obs_keys`, `backend`; with the same injected
`initial_noise` (B, H, A) and `step_noise` (K, B, H, A) they return the same trajectory within the
export parity bounds.

Parameter names are the C++ runtime's (dpkit::PolicyParams), in every backend that has the parameter:
`provider` ("cpu" | "cuda" | "tensorrt"), `threads`, `allow_spinning`, `max_batch`, `verify_sha256`. The
older Python spellings stay accepted: `spin` (= allow_spinning, ort and cpp) and `providers` (ort: a list of
ONNX Runtime provider names; cpp: its first entry). `max_batch` (cpp) defaults to 8 in Python although
PolicyParams::max_batch is 1 in C++: the pybind module's own default is 8 too, and Python callers (the
evaluation's vectorized batch, tests) sample batches above 1 without naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpkit.errors import DpkitError

BACKENDS = ("torch", "ort", "cpp")


def backend_for(path: str | Path) -> str:
    """The backend `load_policy(path)` uses when none is named: a bundle folder (it has policy.json) runs in
    the C++ runtime ("cpp"), or in "ort" when this install lacks the C++ module (which then refuses it with one
    line saying how to build the module: the bundle reader is compiled too, dpkit.runtime.bundle); anything else
    that exists (a training run folder, a checkpoint) is the PyTorch policy ("torch"). A missing path is a
    DpkitError."""
    p = Path(path)
    if (p / "policy.json").is_file():
        try:
            import dpkit.runtime.cpp_policy  # noqa: F401  (imports the compiled _core)
        except ImportError:
            return "ort"
        return "cpp"
    if not p.exists():
        raise DpkitError(f"{path} does not exist (expected a bundle folder, a training run folder or a checkpoint)")
    return "torch"


def load_policy(path: str | Path, backend: str | None = None, **options: Any):
    """A policy for `path`: a checkpoint or run folder ("torch") or a bundle folder ("cpp", "ort").

    `backend=None` chooses from what the path is (`backend_for`: a bundle -> "cpp", else "ort" when the C++
    module is missing; a run folder or checkpoint -> "torch"); a named backend is used as given.
    `options` go to the backend, under the C++ runtime's names (see the module docstring): torch: `ema=True,
    device="cpu", threads=None` (`provider="cpu"|"cuda"` is taken as `device`); ort: `provider=None`
    (or `providers=[...]`), `threads=None, verify_sha256=True, allow_spinning=None` (or `spin`); cpp: see
    dpkit.runtime.cpp_policy (`provider="cpu", threads=None, max_batch=8, seed=0, allow_spinning=None`, ...).
    Every backend takes `threads=` with one meaning (None or 0: dpkit.threads' choice for this machine and
    model) and records the choice in `policy.threads`; idle ONNX Runtime threads do not spin unless
    `allow_spinning=True`.
    """
    if backend is None:
        backend = backend_for(path)
    if backend == "torch":
        from dpkit.runtime.torch_policy import TorchPolicy  # imports torch: only for this backend

        if "provider" in options:  # the one name for where it runs; torch calls it device
            provider = options.pop("provider")
            if "device" in options and options["device"] != provider:
                raise DpkitError(f"provider={provider!r} and device={options['device']!r} disagree")
            options["device"] = provider
        return TorchPolicy(path, **options)
    if backend == "ort":
        from dpkit.runtime.ort_policy import OrtPolicy

        return OrtPolicy(path, **options)
    if backend == "cpp":
        try:
            from dpkit.runtime.cpp_policy import CppPolicy
        except ImportError as e:
            raise DpkitError(f"the 'cpp' backend is not available in this install ({e}); "
                             "build dpkit with its C++ extension (pip install .)") from None
        return CppPolicy(path, **options)
    raise DpkitError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "backend_for", "load_policy"]
