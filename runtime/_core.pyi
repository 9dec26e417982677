"""Typed stub of the C++ runtime module (cpp/python/module.cpp); use it through dpkit.runtime.cpp_policy."""

from typing import Any, TypedDict

import numpy as np

from dpkit.errors import InputError as InputError  # dpkit::InputError; a DpkitError and a ValueError
from dpkit.errors import RuntimeFailure as Error  # any other dpkit::Error; a DpkitError and a RuntimeError

class PolicyInfo(TypedDict):
    """Policy.info: dpkit::PolicyInfo (cpp/include/dpkit/runtime.hpp), read from the bundle by the C++ reader."""
    bundle_dir: str
    obs_mode: str  # "lowdim" or "image"
    n_obs_steps: int  # To
    horizon: int  # H
    n_action_steps: int  # Ta
    action_dim: int  # A
    first_action_index: int
    cond_dim: int
    max_batch: int
    observations: list[tuple[str, tuple[int, ...]]]  # (name, shape without batch and time), in graph order
    action_scale: list[float]  # (A,): actions = trajectory * scale + offset
    action_offset: list[float]
    samplers: list[tuple[str, str, int]]  # (name, "ddpm" | "ddim", num_inference_steps), in policy.json order
    default_sampler: str  # a name from samplers, e.g. "ddim-10"
    precision: str  # the denoiser's weights: "fp32", "fp16" or "int8"
    provider: str  # "cpu", "cuda" or "tensorrt"
    ort_version: str
    ort_library: str

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
    def __init__(self, bundle_dir: str, provider: str = "cpu", threads: int = 1, max_batch: int = 8, seed: int = 0,
                 ort_library: str = "", verify_sha256: bool = True, device_id: int = 0,
                 allow_spinning: bool = False) -> None: ...
    @property
    def info(self) -> PolicyInfo: ...
    @property
    def last_timing(self) -> dict[str, float]: ...  # total_ms, encoder_ms, denoiser_ms, loop_ms, steps
    def find_sampler(self, sampler: str | None = None, num_inference_steps: int | None = None) -> Sampler: ...
    def reseed(self, seed: int) -> None: ...
    def sample(self, observations: list[np.ndarray], sampler: Sampler, initial_noise: np.ndarray | None = None,
               step_noise: np.ndarray | None = None, prefix: np.ndarray | None = None, prefix_start: int = -1,
               prefix_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]: ...

class RealTimeController:
    """dpkit::RealTimeController (use it through dpkit.runtime.realtime.make_controller). The worker holds the
    policy's lock around each chunk; `step` releases the GIL."""
    def __init__(self, policy: Policy, execution: str = "async-inpaint", delay: int | None = None, margin: int = 0,
                 blend: int = 0, sampler: str | None = None, num_inference_steps: int | None = None, seed: int = 0,
                 period: float = 0.1, batch: int = 1, worker_cpus: list[int] = ..., worker_priority: int = 0) -> None: ...
    def step(self, observations: dict[str, np.ndarray] | list[np.ndarray]) -> np.ndarray: ...  # (B, A)
    @property
    def worker_setup(self) -> str: ...  # what worker_cpus / worker_priority did, or why the OS refused
    @property
    def stats(self) -> dict[str, Any]: ...  # ticks, requests, chunks, deadline_misses, wait_ticks, latencies_s, latency_ms
    @property
    def switched(self) -> bool: ...
    @property
    def batch(self) -> int: ...
    def expected_delay(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> "RealTimeController": ...
    def __exit__(self, *exc: Any) -> None: ...
    @staticmethod
    def request_seed(seed: int, request: int) -> int: ...
