"""The "cpp" backend: the C++ runtime (dpkit::Policy) through the pybind11 module dpkit.runtime._core.

    from dpkit.runtime import load_policy
    policy = load_policy("bundles/tiny", backend="cpp", threads=2, max_batch=8)
    traj = policy.sample(obs, sampler="ddim", steps=10, seed=0)     # (B, H, A), normalized
    actions = policy.predict_action(obs)                            # (B, Ta, A), environment units

The whole reverse loop runs in C++ with the GIL released; numpy float32 C-contiguous inputs are read in
place. One CppPolicy may be shared by threads: its calls are serialized by a lock inside the module (for
parallel sampling give each thread its own). The ONNX Runtime library is the one inside the installed
`onnxruntime` Python package, so the module needs no system ONNX Runtime. Errors are `_core.InputError` (a DpkitError and a ValueError) for
bad shapes/values and `_core.Error` (a DpkitError and a RuntimeError) for the rest.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from dpkit.errors import DpkitError
from dpkit.runtime import _core
from dpkit.runtime.bundle import load_bundle
from dpkit.runtime.sampling import draw_noise


def onnxruntime_library() -> str:
    """Path of libonnxruntime.so inside the installed `onnxruntime` (or `onnxruntime-gpu`) package."""
    if os.environ.get("DPKIT_ORT_LIBRARY"):
        return os.environ["DPKIT_ORT_LIBRARY"]
    try:
        import onnxruntime
    except ImportError:
        raise DpkitError("the 'cpp' backend needs the onnxruntime Python package (pip install onnxruntime)") from None
    capi = Path(onnxruntime.__file__).parent / "capi"
    found = sorted(glob.glob(str(capi / "libonnxruntime.so*")))
    if not found:
        raise DpkitError(f"no libonnxruntime.so in {capi}; set DPKIT_ORT_LIBRARY to one")
    return found[0]


class CppPolicy:
    backend = "cpp"

    def __init__(self, bundle_dir: str | Path, provider: str = "cpu", threads: int = 2, max_batch: int = 8,
                 seed: int = 0, verify_sha256: bool = True, device_id: int = 0, allow_spinning: bool = True):
        """Load the bundle. `threads`: ONNX Runtime intra-op threads; `max_batch`: largest batch `sample`
        takes (buffers are preallocated for it); `seed`: the noise generator used when no seed/noise is given.
        """
        self._policy = _core.Policy(str(bundle_dir), provider=provider, threads=int(threads),
                                    max_batch=int(max_batch), seed=int(seed), ort_library=onnxruntime_library(),
                                    verify_sha256=verify_sha256, device_id=int(device_id),
                                    allow_spinning=allow_spinning)
        # C++ validated the bundle (and its sha256); the manifest is read in Python too (cheap, no hashing)
        # so that sampler selection follows exactly the rule of the other backends.
        self.bundle = load_bundle(bundle_dir, verify_sha256=False)
        info = self._policy.info
        self.info = info
        self.obs_mode = info["obs_mode"]
        self.n_obs_steps = info["n_obs_steps"]
        self.horizon = info["horizon"]
        self.n_action_steps = info["n_action_steps"]
        self.action_dim = info["action_dim"]
        self.obs_keys = tuple(name for name, _ in info["observations"])
        self.max_batch = info["max_batch"]
        self.provider = info["provider"]
        self.ort_version = info["ort_version"]
        self._index = {name: i for i, (name, _, _) in enumerate(info["samplers"])}

    def _run(self, obs: dict[str, np.ndarray], sampler: str | None, steps: int | None,
             initial_noise: np.ndarray | None, step_noise: np.ndarray | None, seed: int | None):
        if not isinstance(obs, dict) or set(obs) != set(self.obs_keys):
            got = sorted(obs) if isinstance(obs, dict) else type(obs).__name__
            raise _core.InputError(f"obs keys {got} do not match the policy's {list(self.obs_keys)}")
        spec = self.bundle.schedule.find(sampler, steps)
        arrays = [np.asarray(obs[k]) for k in self.obs_keys]
        for k, a in zip(self.obs_keys, arrays):
            if a.dtype.kind not in "fiu":
                raise _core.InputError(f"observation '{k}' has dtype {a.dtype}, expected float32 (or another real number type)")
        if seed is not None and (initial_noise is None or (spec.sampler == "ddpm" and step_noise is None)):
            # A Python-level seed means the same noise as the "torch"/"ort" backends (numpy's generator,
            # fixed draw order), so backends given one seed give the same trajectories; C++ only samples.
            batch = arrays[0].shape[0] if getattr(arrays[0], "ndim", 0) else 0
            initial_noise, step_noise = draw_noise((batch, self.horizon, self.action_dim),
                                                   spec.num_inference_steps, spec.sampler == "ddpm",
                                                   initial_noise, step_noise, seed)
        return self._policy.sample(arrays, self._index[spec.name], initial_noise, step_noise)

    @property
    def last_timing(self) -> dict[str, float]:
        """Where the last call's time went, measured in C++ (ms): `total_ms`, `encoder_ms`, `denoiser_ms`
        (all K runs), `loop_ms` (the rest: checks, copies, noise, step arithmetic) and `steps`."""
        return self._policy.last_timing

    def sample(self, obs: dict[str, np.ndarray], sampler: str | None = None, steps: int | None = None,
               initial_noise: np.ndarray | None = None, step_noise: np.ndarray | None = None,
               seed: int | None = None) -> np.ndarray:
        """(B, H, A) normalized trajectory. Injected noise: initial (B, H, A), per step (K, B, H, A)."""
        return self._run(obs, sampler, steps, initial_noise, step_noise, seed)[0]

    def predict_action(self, obs: dict[str, np.ndarray], sampler: str | None = None, steps: int | None = None,
                       initial_noise: np.ndarray | None = None, step_noise: np.ndarray | None = None,
                       seed: int | None = None) -> np.ndarray:
        """(B, Ta, A) actions in environment units (un-normalized in C++)."""
        return self._run(obs, sampler, steps, initial_noise, step_noise, seed)[1]
