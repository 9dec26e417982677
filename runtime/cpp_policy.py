"""The "cpp" backend: the C++ runtime (dpkit::Policy) through the pybind11 module dpkit.runtime._core.

    from dpkit.runtime import load_policy
    policy = load_policy("bundles/tiny", backend="cpp", max_batch=8)    # threads: dpkit.threads
    policy = load_policy("bundles/tiny")                            # a bundle means cpp
    traj = policy.sample(obs, sampler="ddim", steps=10, seed=0)     # (B, H, A), normalized
    actions = policy.predict_action(obs)                            # (B, Ta, A), environment units

The whole reverse loop runs in C++ with the GIL released; numpy float32 C-contiguous inputs are read in
place. One CppPolicy may be shared by threads: its calls are serialized by a lock inside the module (for
parallel sampling give each thread its own). The ONNX Runtime library is the one inside the installed
`onnxruntime` Python package, so the module needs no system ONNX Runtime. Errors are dpkit.errors'
InputError (a ValueError) for bad shapes/values and RuntimeFailure (a RuntimeError) for the rest, raised
by C++ itself (`_core.InputError` and `_core.Error` are those classes).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from dpkit.errors import DpkitError
from dpkit.runtime import _core
from dpkit.runtime.backend import PolicyBackend, PolicySpec, SamplerChoice, resolve_provider
from dpkit.runtime.realtime import _int_in  # the one integer range check of the runtime's pybind callers
from dpkit.sampling_args import MAX_SEED
from dpkit.threads import bundle_params, choose_threads, resolve_spin


INT_MAX = 2**31 - 1  # a C++ int
MAX_STEPS = 1_000_000  # the most denoising steps _core's find_sampler takes (a bundle lists at most 1000)


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


class CppPolicy(PolicyBackend):
    backend = "cpp"
    draws_own_noise = True  # no seed and nothing injected: the C++ generator draws, allocation-free
    checks_obs_values = True  # shapes, batch and NaN/Inf are checked in C++

    def __init__(self, bundle_dir: str | Path, provider: str = "cpu", threads: int | None = None, max_batch: int = 8,
                 seed: int = 0, verify_sha256: bool = True, device_id: int = 0, allow_spinning: bool | None = None,
                 *, spin: bool | None = None, providers: list | None = None):
        """Load the bundle. Parameters are dpkit::PolicyParams'. `provider`: "cpu", "cuda" or "tensorrt" (an
        unavailable one is an error; `providers`, the ort backend's older list spelling, is taken by its first
        entry); `threads`: ONNX Runtime intra-op threads (None or 0: dpkit.threads' choice for the bundle's
        size, recorded in `self.threads`); `allow_spinning` (older name `spin`): let idle threads busy-wait
        (default no); `max_batch`: largest batch `sample` takes (buffers are preallocated for it; default 8
        here, as the pybind module's, where C++'s PolicyParams says 1: Python callers sample batches above 1
        without naming it); `seed`: the noise generator used when no seed/noise is given.
        """
        if providers:  # the older list spelling; a bare `provider` is checked by C++ itself
            provider = resolve_provider(None if provider == "cpu" else provider, providers)
        # Every integer is range-checked here, before pybind11 casts it to a C++ int (or uint64): one clear
        # InputError instead of "Unable to cast" / "incompatible constructor arguments".
        _int_in(max_batch, "max_batch", 1, INT_MAX)
        _int_in(seed, "seed", 0, MAX_SEED)
        _int_in(device_id, "device_id", 0, INT_MAX)
        self.threads = choose_threads(threads, params=bundle_params(bundle_dir),
                                      spin=resolve_spin(spin, allow_spinning))
        self._policy = _core.Policy(str(bundle_dir), provider=provider, threads=self.threads.threads,
                                    max_batch=int(max_batch), seed=int(seed), ort_library=onnxruntime_library(),
                                    verify_sha256=verify_sha256, device_id=int(device_id),
                                    allow_spinning=self.threads.spin)
        # C++ read and validated policy.json; everything Python needs comes from what it reports.
        info = self._policy.info
        self.info = info
        observations = tuple({"name": name, "shape": list(shape), "dtype": "float32"}
                             for name, shape in info["observations"])
        super().__init__(PolicySpec(info["obs_mode"], info["n_obs_steps"], info["horizon"], info["n_action_steps"],
                                    info["action_dim"], info["first_action_index"], observations,
                                    np.asarray(info["action_scale"]), np.asarray(info["action_offset"])))
        self.max_batch = info["max_batch"]
        self.provider = info["provider"]
        self.ort_version = info["ort_version"]
        self._last_actions: np.ndarray | None = None

    def _find(self, sampler: str | None, steps: int | None) -> SamplerChoice:
        if steps is not None:  # resolve_sampler checked it is an integer >= 1; C++ takes at most MAX_STEPS
            _int_in(steps, "steps", 1, MAX_STEPS)
        h = self._policy.find_sampler(sampler, steps)
        return SamplerChoice(h.name, h.sampler, h.num_inference_steps, h.uses_step_noise, h)

    def _run(self, arrays, batch, choice, initial_noise, step_noise, inpaint) -> np.ndarray:
        if inpaint is None:
            traj, _ = self._policy.sample(list(arrays.values()), choice.handle, initial_noise, step_noise)
        else:
            traj, _ = self._policy.sample(list(arrays.values()), choice.handle, initial_noise, step_noise,
                                          inpaint.values, inpaint.start, inpaint.weights)
        return traj

    @property
    def last_loop_ms(self) -> float | None:
        return self._policy.last_timing["loop_ms"]

    @property
    def last_timing(self) -> dict[str, float]:
        """Where the last call's time went, measured in C++ (ms): `total_ms`, `encoder_ms`, `denoiser_ms`
        (all K runs), `loop_ms` (the rest: checks, copies, noise, step arithmetic) and `steps`."""
        return self._policy.last_timing
