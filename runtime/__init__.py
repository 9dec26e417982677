"""Sample a trained policy from Python: one interface over PyTorch, ONNX Runtime and the C++ runtime.

    from dpkit.runtime import load_policy
    policy = load_policy("bundles/tiny", backend="ort")          # or "cpp"; "torch" takes a checkpoint
    traj = policy.sample(obs, sampler="ddim", steps=10, seed=0)  # (B, H, A) normalized
    actions = policy.predict_action(obs)                         # (B, Ta, A) environment units

`obs` is a dict of numpy arrays named as in the bundle's policy.json ("image" + "agent_pos", or "obs"),
each (B, To, ...). Every backend has `sample`, `predict_action` and the attributes `n_obs_steps`,
`horizon`, `n_action_steps`, `action_dim`, `obs_mode`, `obs_keys`, `backend`; with the same injected
`initial_noise` (B, H, A) and `step_noise` (K, B, H, A) they return the same trajectory within the
export parity bounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpkit.errors import DpkitError

BACKENDS = ("torch", "ort", "cpp")


def load_policy(path: str | Path, backend: str = "torch", **options: Any):
    """A policy for `path`: a checkpoint or run folder ("torch") or a bundle folder ("ort", "cpp").

    `options` go to the backend: torch: `ema=True, device="cpu", threads=None`; ort: `providers=None,
    threads=None, verify_sha256=True, spin=None`; cpp: see dpkit.runtime.cpp_policy. Every backend takes
    `threads=` with one meaning (None or 0: dpkit.threads' choice for this machine and model) and records
    the choice in `policy.threads`; idle ONNX Runtime threads do not spin unless `spin=True`.
    """
    if backend == "torch":
        from dpkit.runtime.torch_policy import TorchPolicy  # imports torch: only for this backend

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


__all__ = ["BACKENDS", "load_policy"]
