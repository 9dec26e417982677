"""Typed stub of the C++ runtime module (cpp/python/module.cpp); use it through dpkit.runtime.cpp_policy."""

from typing import Any

import numpy as np

from dpkit.errors import DpkitError

class Error(DpkitError, RuntimeError): ...
class InputError(Error, ValueError): ...

class Sampler:
    """A sampler of one Policy (made only by Policy.find_sampler); sample() refuses one of another Policy."""
    @property
    def name(self) -> str: ...  # e.g. "ddim-10"
    @property
    def sampler(self) -> str: ...  # "ddpm" or "ddim"
    @property
    def num_inference_steps(self) -> int: ...
    @property
    def uses_step_noise(self) -> bool: ...  # True for DDPM; DDIM (eta = 0) ignores step_noise

class Policy:
    def __init__(self, bundle_dir: str, provider: str = "cpu", threads: int = 2, max_batch: int = 8, seed: int = 0,
                 ort_library: str = "", verify_sha256: bool = True, device_id: int = 0,
                 allow_spinning: bool = True) -> None: ...
    @property
    def info(self) -> dict[str, Any]: ...  # ... "default_sampler": name, "action_scale"/"action_offset": lists
    @property
    def last_timing(self) -> dict[str, float]: ...  # total_ms, encoder_ms, denoiser_ms, loop_ms, steps
    def find_sampler(self, sampler: str | None = None, num_inference_steps: int | None = None) -> Sampler: ...
    def reseed(self, seed: int) -> None: ...
    def sample(self, observations: list[np.ndarray], sampler: Sampler, initial_noise: np.ndarray | None = None,
               step_noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]: ...
