"""TensorRT engines for a bundle (`dpkit-export --tensorrt`), stored in the bundle's `trt_cache/`.

ONNX Runtime's TensorrtExecutionProvider (onnxruntime-gpu) builds them: sessions with the engine cache
enabled in `trt_cache/` and the optimization profile of the manifest's `tensorrt` entry (min/opt/max
batch, precision; dpkit.runtime.bundle.ort_trt_options); running them at the profile's min and max batch
builds and caches the engines, which every later session with the same options (the "ort" backend, the
C++ runtime's "tensorrt" provider) loads instead of rebuilding. That cache is the only engine format
dpkit writes: no runtime reads stand-alone TensorRT `.engine` files. Needs an NVIDIA GPU; when something
is missing, `TensorRTUnavailable` names it (exit code 2) and the ONNX bundle written before stays valid.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.errors import DpkitError
from dpkit.io import atomic_dir
from dpkit.runtime.bundle import ort_trt_options, trt_profile_inputs


class TensorRTUnavailable(DpkitError):
    exit_code = 2


def cuda_gpu_count() -> tuple[int, str]:
    """(number of CUDA devices, why 0) from the driver library itself (torch may be a CPU build)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 not found)"
    if cuda.cuInit(0) != 0:
        return 0, "the NVIDIA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "no CUDA device"
    return count.value, ""


def _ort_has_trt() -> bool:
    import onnxruntime as ort

    return "TensorrtExecutionProvider" in ort.get_available_providers()


def check_available() -> None:
    """Raise TensorRTUnavailable saying what is missing (a GPU, onnxruntime-gpu's TensorRT provider)."""
    gpus, why = cuda_gpu_count()
    missing = []
    if gpus == 0:
        missing.append(f"an NVIDIA GPU ({why})")
    if not _ort_has_trt():
        missing.append("ONNX Runtime's TensorrtExecutionProvider (install onnxruntime-gpu and TensorRT; "
                       "see `pip install dpkit[gpu]`)")
    if missing:
        raise TensorRTUnavailable("cannot build TensorRT engines: missing " + " and ".join(missing)
                                  + "; the ONNX bundle is complete and valid without them")


def build_engines(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Build both engines into the bundle's cache folder with the manifest's profile; returns the
    manifest's `tensorrt` entry with `engines: true`."""
    trt = manifest.get("tensorrt")
    if not trt:
        raise DpkitError(f"{bundle_dir}: policy.json has no tensorrt profile (re-export the bundle)")
    check_available()
    shapes = trt_profile_inputs(manifest)
    # Built in a temp folder that replaces the cache only when both engines are done: a failed build
    # leaves no partial cache (and an earlier complete one stays).
    with atomic_dir(bundle_dir / trt["cache_dir"], force=True) as cache:
        for graph, inputs in shapes.items():
            onnx_path = bundle_dir / manifest["models"][graph]["file"]
            try:
                _build_with_ort(onnx_path, cache, inputs, trt)
            except DpkitError:
                raise
            except Exception as e:  # TensorRT / ONNX Runtime errors: one line naming the graph
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DpkitError(f"TensorRT engine build for {onnx_path.name} failed: {msg}") from None
    return {**trt, "engines": True}


def _build_with_ort(onnx_path: Path, cache: Path, inputs: dict[str, tuple[int, ...]], trt: dict[str, Any]) -> None:
    import onnxruntime as ort

    opts = ort_trt_options(cache, inputs, trt)
    sess = ort.InferenceSession(str(onnx_path), providers=[("TensorrtExecutionProvider", opts), "CUDAExecutionProvider"])
    if sess.get_providers()[0] != "TensorrtExecutionProvider":
        raise TensorRTUnavailable(f"ONNX Runtime did not enable TensorRT for {onnx_path.name} "
                                  f"(providers in use: {sess.get_providers()}); check the TensorRT libraries")
    for b in sorted({int(trt["min_batch"]), int(trt["max_batch"])}):  # running the session builds (and caches) the engine
        feed = {n: (np.zeros((b, *s), np.int64) if n == "timestep" else np.zeros((b, *s), np.float32))
                for n, s in inputs.items()}
        sess.run(None, feed)
