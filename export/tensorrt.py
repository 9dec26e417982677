"""TensorRT engines for a bundle (`dpkit-export --tensorrt`), stored in the bundle's `trt_cache/`.

Two routes, the first available wins:
  1. the TensorRT Python API (`import tensorrt`): parse each .onnx, one optimization profile for batch
     1..max_batch, serialize `trt_cache/{encoder,denoiser}.engine`;
  2. ONNX Runtime's TensorrtExecutionProvider (onnxruntime-gpu): sessions with the engine cache enabled
     in `trt_cache/` and explicit profile shapes; running them at batch 1 and max_batch builds and
     caches the engines, which later ORT sessions with the same options load instead of rebuilding.
Both need an NVIDIA GPU. When something is missing, `TensorRTUnavailable` names it (exit code 2); the
ONNX bundle written before is valid either way.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.errors import DpkitError
from dpkit.io import atomic_dir, atomic_write_bytes
from dpkit.runtime.bundle import TRT_CACHE_DIR as CACHE_DIR
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


def check_available() -> str:
    """The route to use ("tensorrt" or "ort"), or raise TensorRTUnavailable saying what is missing."""
    have_api = importlib.util.find_spec("tensorrt") is not None
    have_ort = _ort_has_trt()
    gpus, why = cuda_gpu_count()
    missing = []
    if gpus == 0:
        missing.append(f"an NVIDIA GPU ({why})")
    if not (have_api or have_ort):
        missing.append("TensorRT (neither the `tensorrt` Python package nor onnxruntime-gpu's "
                       "TensorrtExecutionProvider is installed; see `pip install dpkit[gpu]`)")
    if missing:
        raise TensorRTUnavailable("cannot build TensorRT engines: missing " + " and ".join(missing)
                                  + "; the ONNX bundle is complete and valid without them")
    return "tensorrt" if have_api else "ort"


def build_engines(bundle_dir: Path, manifest: dict[str, Any], max_batch: int, fp16: bool) -> dict[str, Any]:
    """Build both engines into `bundle_dir/trt_cache`; returns the manifest's `tensorrt` entry."""
    if max_batch < 1:
        raise DpkitError(f"--max-batch must be >= 1, got {max_batch}")
    route = check_available()
    shapes = trt_profile_inputs(manifest)
    # Built in a temp folder that replaces trt_cache/ only when both engines are done: a failed build
    # leaves no partial cache (and an earlier complete one stays).
    with atomic_dir(bundle_dir / CACHE_DIR, force=True) as cache:
        for graph, inputs in shapes.items():
            onnx_path = bundle_dir / manifest["models"][graph]["file"]
            try:
                if route == "tensorrt":
                    _build_with_api(onnx_path, cache / f"{graph}.engine", inputs, max_batch, fp16)
                else:
                    _build_with_ort(onnx_path, cache, inputs, max_batch, fp16)
            except DpkitError:
                raise
            except Exception as e:  # TensorRT / ONNX Runtime errors: one line naming the graph
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DpkitError(f"TensorRT engine build for {onnx_path.name} failed: {msg}") from None
    return {"cache_dir": CACHE_DIR, "max_batch": max_batch, "precision": "fp16" if fp16 else "fp32", "route": route}


def _build_with_api(onnx_path: Path, engine_path: Path, inputs: dict[str, tuple[int, ...]], max_batch: int, fp16: bool) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DpkitError(f"TensorRT cannot parse {onnx_path.name}: {errs}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    opt = max(1, min(8, max_batch))
    for name, shape in inputs.items():
        profile.set_shape(name, (1, *shape), (opt, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise DpkitError(f"TensorRT failed to build an engine for {onnx_path.name} (see its log above)")
    atomic_write_bytes(engine_path, bytes(engine))


def _build_with_ort(onnx_path: Path, cache: Path, inputs: dict[str, tuple[int, ...]], max_batch: int, fp16: bool) -> None:
    import onnxruntime as ort

    opts = ort_trt_options(cache, inputs, max_batch, fp16)
    sess = ort.InferenceSession(str(onnx_path), providers=[("TensorrtExecutionProvider", opts), "CUDAExecutionProvider"])
    if sess.get_providers()[0] != "TensorrtExecutionProvider":
        raise TensorRTUnavailable(f"ONNX Runtime did not enable TensorRT for {onnx_path.name} "
                                  f"(providers in use: {sess.get_providers()}); check the TensorRT libraries")
    for b in sorted({1, max_batch}):  # running the session is what builds (and caches) the engine
        feed = {n: (np.zeros((b, *s), np.int64) if n == "timestep" else np.zeros((b, *s), np.float32))
                for n, s in inputs.items()}
        sess.run(None, feed)
