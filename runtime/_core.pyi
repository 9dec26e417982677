"""Typed stub of the C++ runtime module (cpp/python/module.cpp); use it through dpkit.runtime.cpp_policy (the
runtime) and dpkit.runtime.bundle (the bundle reader)."""

from typing import Any, TypedDict

import numpy as np

from dpkit.errors import InputError as InputError  # dpkit::InputError; a DpkitError and a ValueError
from dpkit.errors import RuntimeFailure as Error  # any other dpkit::Error; a DpkitError and a RuntimeError

# The bundle reader alone (cpp/src/manifest.cpp; no ONNX Runtime session): dpkit.runtime.bundle's source.
def read_bundle(bundle_dir: str, verify_sha256: bool = True, check_files: bool = True) -> str:
    """Apply every rule of the bundle format to the folder (policy.json read once; with check_files the files it
    names, the graphs' inputs/outputs and precision; with verify_sha256 every sha256) and return the checked
    policy.json as compact JSON text in the file's key order. A refusal is one line: Error (RuntimeFailure)."""
    ...

class OnnxInfo(TypedDict):
    """read_onnx_info: what the reader's protobuf walk knows of an .onnx file."""
    inputs: list[tuple[str, int, tuple[int | None, ...]]]  # (name, ONNX element type, dims; None = dynamic)
    outputs: list[tuple[str, int, tuple[int | None, ...]]]
    external: set[str]  # external-data locations its tensors reference
    op_types: dict[str, int]  # node op type -> count
    tensor_types: dict[int, int]  # tensor data type -> count
    precision: str  # "fp32", "fp16" or "int8", derived from the nodes and tensors
    evidence: str  # why, e.g. "no integer quantization nodes, no int8/uint8 or float16 tensors"

def read_onnx_info(path: str) -> OnnxInfo: ...
def bundle_limits() -> dict[str, int]: ...  # the reader's size limits by name, e.g. "max_trt_batch"

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
