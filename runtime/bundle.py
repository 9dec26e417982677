"""Read and validate a dpkit bundle (docs/bundle-format.md): every rule a reader of format version 1 applies.

    from dpkit.runtime.bundle import load_bundle
    b = load_bundle("bundles/tiny")        # raises DpkitError on any mismatch
    b.schedule.find("ddim", 10).timesteps

Needs only numpy: this is what a runtime-only install reads. The C++ reader (cpp/src/manifest.cpp)
applies the same rules with the same messages; cpp/tests/data/damaged_bundles.json is the table of
damaged bundles both test suites refuse. Caller observations are checked by the backends
(dpkit.runtime.backend.validate_observations).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.errors import DpkitError
from dpkit.io import MAX_JSON_DEPTH, json_depth, sha256_file  # noqa: F401  (json_depth: the one home is dpkit.io)
from dpkit.runtime.onnx_info import (DTYPE_NAMES, FLOAT, INT64, OnnxError, graph_precision, precision_fits,
                                     read_onnx_info)
from dpkit.sampling import KINDS, SamplerSpec
from dpkit.sampling_args import resolve_sampler

FORMAT = "dpkit-bundle"
FORMAT_VERSION = 1
MANIFEST = "policy.json"
GRAPHS = ("encoder", "denoiser")
PRECISIONS = ("fp32", "fp16", "int8")  # models.<graph>.precision (docs/bundle-format.md, "Precision")
PREDICTION_TYPES = ("epsilon", "sample")  # scheduler.prediction_type: what the denoiser outputs (epsilon or x0)

# Bounds every reader applies before sizing anything from the manifest (docs/bundle-format.md, "Limits");
# cpp/src/manifest.cpp has the same numbers.
MAX_N_OBS_STEPS = 256
MAX_HORIZON = 4096
MAX_ACTION_DIM = 256
MAX_COND_DIM = 1 << 20
MAX_OBSERVATIONS = 64
MAX_OBS_DIMS = 8  # entries of one observation's shape
MAX_OBS_SIZE = 1 << 16  # one entry of an observation's shape
MAX_OBS_FLOATS = 1 << 26  # n_obs_steps * prod(shape) of one observation, per batch element
MAX_TRAIN_TIMESTEPS = 10000
MAX_SAMPLERS = 1024
MAX_EXTERNAL_FILES = 64
MAX_TRT_BATCH = 65536


# --------------------------------------------------------------------------- reading policy.json


class _Reader:
    """Typed access to manifest values: every missing key or wrong value becomes one DpkitError
    "<where>: <key path> <problem>", worded as the C++ reader words it (cpp/src/manifest.cpp, Reader)."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, what: str):
        raise DpkitError(f"{self.where}: {key} {what}")

    @staticmethod
    def join(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def at(self, obj: Any, key: str, path: str = "") -> Any:
        if not isinstance(obj, dict):
            self.fail(path or "(top level)", "must be an object")
        if key not in obj:
            self.fail(self.join(path, key), "is missing")
        return obj[key]

    def str(self, obj: Any, key: str, path: str = "") -> str:
        v = self.at(obj, key, path)
        if not isinstance(v, str):
            self.fail(self.join(path, key), "must be a string")
        return v

    def integer(self, obj: Any, key: str, path: str = "", lo: int = 0, hi: int = 1 << 30) -> int:
        v = self.at(obj, key, path)
        if not _is_int(v):
            self.fail(self.join(path, key), "must be an integer")
        if v < lo:
            self.fail(self.join(path, key), f"must be >= {lo}, got {v}")
        if v > hi:
            self.fail(self.join(path, key), f"must be <= {hi}, got {v}")
        return v

    def number(self, obj: Any, key: str, path: str = "") -> float:
        v = self.at(obj, key, path)
        if not _is_finite_number(v):
            self.fail(self.join(path, key), "must be a finite number")
        return float(v)

    def boolean(self, obj: Any, key: str, path: str = "") -> bool:
        v = self.at(obj, key, path)
        if not isinstance(v, bool):
            self.fail(self.join(path, key), "must be true or false")
        return v

    def numbers(self, obj: Any, key: str, path: str, n: int, integers: bool = False, float32: bool = False) -> list:
        """n finite numbers (integers only with `integers`; `float32`: finite also once stored as float32)."""
        v = self.at(obj, key, path)
        if not isinstance(v, list) or len(v) != n:
            self.fail(self.join(path, key), f"must be a list of {n} numbers")
        for e in v:
            if not _is_finite_number(e) or (float32 and not abs(float(e)) <= _FLOAT32_MAX):
                self.fail(self.join(path, key), "must hold finite numbers only")
            if integers and not _is_int(e):
                self.fail(self.join(path, key), "must hold integers only")
        return v

    def strings(self, obj: Any, key: str, path: str) -> list[str]:
        v = self.at(obj, key, path)
        if not isinstance(v, list) or not all(isinstance(e, str) for e in v):
            self.fail(self.join(path, key), "must be a list of strings")
        return v

    def plain_name(self, obj: Any, key: str, path: str, what: str = "file") -> str:
        v = self.str(obj, key, path)
        if not is_plain_name(v):
            self.fail(self.join(path, key), f"must be a plain {what} name inside the bundle, got {json.dumps(v)}")
        return v

    def sha256(self, obj: Any, key: str, path: str) -> str:
        v = self.str(obj, key, path)
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            self.fail(self.join(path, key), "must be 64 lowercase hex digits")
        return v


# Largest double that rounds to a finite float32 (round to nearest even): FLT_MAX + half an ulp, exclusive.
_FLOAT32_MAX = float(np.nextafter(np.float64(np.finfo(np.float32).max) + 2.0**103, 0.0))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def is_plain_name(name: str) -> bool:
    """A file or folder name directly inside the bundle: no separators, no `.`/`..`, no NUL."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..")
            and not any(c in name for c in "/\\\0"))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # as the C++ reader's JSON parser: a number beyond double range is an error
        raise ValueError(f"number overflow parsing {text!r}")
    return value


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    """Parse policy.json text and apply every manifest rule; returns the manifest dict. `where` (the file
    path) prefixes every error message."""
    if json_depth(text) > MAX_JSON_DEPTH:
        raise DpkitError(f"{where}: JSON nesting is deeper than {MAX_JSON_DEPTH} levels")
    try:
        j = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)  # NaN / Infinity are not JSON
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise DpkitError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(j, dict):
        raise DpkitError(f"{where}: must hold a JSON object")
    validate_manifest(j, where)
    return j


def validate_manifest(j: dict[str, Any], where: str) -> None:
    """The manifest rules (the same, in the same order, as parse_manifest in cpp/src/manifest.cpp)."""
    r = _Reader(where)
    if r.str(j, "format") != FORMAT:
        r.fail("format", f'must be "{FORMAT}"')
    version = r.at(j, "format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        r.fail("format_version", f"is {json.dumps(version)}; this runtime reads format version {FORMAT_VERSION} "
                                 "only (re-export the bundle with a matching dpkit)")
    obs_mode = r.str(j, "obs_mode")
    if obs_mode not in ("lowdim", "image"):
        r.fail("obs_mode", f'must be "lowdim" or "image", got {json.dumps(obs_mode)}')
    to = r.integer(j, "n_obs_steps", "", 1, MAX_N_OBS_STEPS)
    h = r.integer(j, "horizon", "", 1, MAX_HORIZON)
    ta = r.integer(j, "n_action_steps", "", 1, MAX_HORIZON)
    a = r.integer(j, "action_dim", "", 1, MAX_ACTION_DIM)
    first = r.integer(j, "first_action_index", "", 0, MAX_HORIZON)
    r.integer(j, "cond_dim", "", 1, MAX_COND_DIM)
    if first != to - 1:
        r.fail("first_action_index", f"must be n_obs_steps - 1 ({to - 1}), got {first}")
    if first + ta > h:
        r.fail("first_action_index", f"+ n_action_steps ({first} + {ta}) exceeds horizon {h}")

    obs = r.at(j, "observations")
    if not isinstance(obs, list) or not obs:
        r.fail("observations", "must be a non-empty list")
    if len(obs) > MAX_OBSERVATIONS:
        r.fail("observations", f"must have at most {MAX_OBSERVATIONS} entries")
    names: set[str] = set()
    for i, o in enumerate(obs):
        path = f"observations[{i}]"
        name = r.str(o, "name", path)
        if not name or name in names:
            r.fail(f"{path}.name", f"must be a unique non-empty string, got {json.dumps(name)}")
        names.add(name)
        shape = r.at(o, "shape", path)
        if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_OBS_DIMS or not all(_is_int(d) for d in shape):
            r.fail(f"{path}.shape", f"must be a list of 1 to {MAX_OBS_DIMS} integers")
        if not all(1 <= d <= MAX_OBS_SIZE for d in shape):
            r.fail(f"{path}.shape", f"must hold sizes in [1, {MAX_OBS_SIZE}]")
        if to * math.prod(shape) > MAX_OBS_FLOATS:
            r.fail(f"{path}.shape", f"holds more than {MAX_OBS_FLOATS} floats per sample (with n_obs_steps)")
        if r.str(o, "dtype", path) != "float32":
            r.fail(f"{path}.dtype", 'must be "float32"')

    norm = r.at(j, "action_normalizer")
    scale = r.numbers(norm, "scale", "action_normalizer", a, float32=True)
    r.numbers(norm, "offset", "action_normalizer", a, float32=True)
    if any(s == 0 for s in scale):
        r.fail("action_normalizer.scale", "must not contain 0")

    _validate_scheduler(r, r.at(j, "scheduler"), "scheduler")

    models = r.at(j, "models")
    _validate_model(r, models, "encoder", ["cond"])
    _validate_model(r, models, "denoiser", ["noise_pred"])
    if models["encoder"]["inputs"] != [o["name"] for o in obs]:
        r.fail("models.encoder.inputs", "must list the observations' names in order")
    if models["denoiser"]["inputs"] != ["sample", "timestep", "cond"]:
        r.fail("models.denoiser.inputs", "must be [sample, timestep, cond]")

    trt = j.get("tensorrt")
    if trt is not None:
        r.plain_name(trt, "cache_dir", "tensorrt", "folder")
        lo = r.integer(trt, "min_batch", "tensorrt", 1, MAX_TRT_BATCH)
        opt = r.integer(trt, "opt_batch", "tensorrt", 1, MAX_TRT_BATCH)
        hi = r.integer(trt, "max_batch", "tensorrt", 1, MAX_TRT_BATCH)
        if not lo <= opt <= hi:
            r.fail("tensorrt.opt_batch", f"must lie in [min_batch, max_batch] = [{lo}, {hi}], got {opt}")
        if r.str(trt, "precision", "tensorrt") not in ("fp32", "fp16"):
            r.fail("tensorrt.precision", 'must be "fp32" or "fp16"')
        r.boolean(trt, "engines", "tensorrt")


def _validate_scheduler(r: _Reader, s: Any, sp: str) -> None:
    if r.str(s, "type", sp) != "ddpm":
        r.fail(f"{sp}.type", 'must be "ddpm"')
    n = r.integer(s, "num_train_timesteps", sp, 1, MAX_TRAIN_TIMESTEPS)
    # what the denoiser outputs; bundles written before "sample" existed always said "epsilon"
    pred = r.str(s, "prediction_type", sp) if "prediction_type" in s else "epsilon"
    if pred not in PREDICTION_TYPES:
        r.fail(f"{sp}.prediction_type", f'must be "epsilon" or "sample", got {json.dumps(pred)}')
    var = r.str(s, "variance_type", sp)
    if var != "fixed_small":
        r.fail(f"{sp}.variance_type", f'must be "fixed_small", got {json.dumps(var)}')
    r.boolean(s, "clip_sample", sp)
    if not r.number(s, "clip_sample_range", sp) > 0:
        r.fail(f"{sp}.clip_sample_range", "must be a finite number > 0")
    r.numbers(s, "betas", sp, n)
    if not all(0 < a < 1 for a in r.numbers(s, "alphas_cumprod", sp, n)):
        r.fail(f"{sp}.alphas_cumprod", "must hold values in (0, 1)")

    samplers = r.at(s, "samplers", sp)
    if not isinstance(samplers, list) or not samplers:
        r.fail(f"{sp}.samplers", "must be a non-empty list")
    if len(samplers) > MAX_SAMPLERS:
        r.fail(f"{sp}.samplers", f"must have at most {MAX_SAMPLERS} entries")
    default = r.str(s, "default_sampler", sp)
    names: set[str] = set()
    for i, e in enumerate(samplers):
        path = f"{sp}.samplers[{i}]"
        name = r.str(e, "name", path)
        if name in names:
            r.fail(f"{path}.name", f"{json.dumps(name)} is listed twice")
        names.add(name)
        kind = r.str(e, "sampler", path)
        if kind not in KINDS:
            r.fail(f"{path}.sampler", f'must be "ddpm", "ddim" or "fewstep", got {json.dumps(kind)}')
        k = r.integer(e, "num_inference_steps", path, 1, n)
        ts = r.numbers(e, "timesteps", path, k, integers=True)
        prev = r.numbers(e, "prev_timesteps", path, k, integers=True)
        for t, p in zip(ts, prev):
            if not 0 <= t < n:
                r.fail(f"{path}.timesteps", "must lie in [0, num_train_timesteps)")
            if not -1 <= p < t:
                r.fail(f"{path}.prev_timesteps", "must lie in [-1, timesteps[k])")
        final = r.number(e, "final_alpha_cumprod", path)
        if not 0 < final <= 1:
            r.fail(f"{path}.final_alpha_cumprod", "must lie in (0, 1]")
        if kind == "fewstep":  # x0 re-noised to the next listed timestep; x0 itself after the last
            if list(prev) != list(ts[1:]) + [-1]:
                r.fail(f"{path}.prev_timesteps", "of a fewstep sampler must be its timesteps[1:] then -1")
            if final != 1.0:
                r.fail(f"{path}.final_alpha_cumprod", "of a fewstep sampler must be 1.0 (its last step returns x0)")
        if r.number(e, "eta", path) != 0.0:
            r.fail(f"{path}.eta", "must be 0.0 in format version 1")
    if default not in names:
        r.fail(f"{sp}.default_sampler", f"{json.dumps(default)} names no entry of {sp}.samplers")


def _validate_model(r: _Reader, models: Any, name: str, outputs: list[str]) -> None:
    path = f"models.{name}"
    m = r.at(models, name, "models")
    file = r.plain_name(m, "file", path)
    r.sha256(m, "sha256", path)
    r.strings(m, "inputs", path)
    if r.strings(m, "outputs", path) != outputs:
        r.fail(f"{path}.outputs", f"must be [{', '.join(outputs)}]")
    dtype = r.str(m, "dtype", path)
    if dtype not in ("float32", "float16"):  # float16 graphs still take and return float32 (casts inside)
        r.fail(f"{path}.dtype", f'must be "float32" or "float16", got {json.dumps(dtype)}')
    _validate_precision(r, m, path, dtype)
    ext = m.get("external_data", [])
    if not isinstance(ext, list) or len(ext) > MAX_EXTERNAL_FILES:
        r.fail(f"{path}.external_data", f"must be a list of at most {MAX_EXTERNAL_FILES} {{file, sha256}} entries")
    seen = {file}
    for i, e in enumerate(ext):
        epath = f"{path}.external_data[{i}]"
        f = r.plain_name(e, "file", epath)
        if f in seen:
            r.fail(f"{epath}.file", f"{json.dumps(f)} is listed twice")
        seen.add(f)
        r.sha256(e, "sha256", epath)


def model_precision(m: dict[str, Any]) -> str:
    """A validated models.<graph> entry's precision: its `precision`, else the one its dtype implies (bundles
    written before int8 existed have no `precision`)."""
    return m.get("precision", "fp16" if m["dtype"] == "float16" else "fp32")


def _validate_precision(r: _Reader, m: dict[str, Any], path: str, dtype: str) -> None:
    """`precision` (optional; default from dtype) and the `quantization` block int8 graphs carry."""
    if "precision" in m:
        precision = r.str(m, "precision", path)
        if precision not in PRECISIONS:
            r.fail(f"{path}.precision", f'must be "fp32", "fp16" or "int8", got {json.dumps(precision)}')
        if (precision == "fp16") != (dtype == "float16"):
            r.fail(f"{path}.precision", f'{json.dumps(precision)} does not match dtype {json.dumps(dtype)}')
    qpath = f"{path}.quantization"
    if model_precision(m) != "int8":
        if "quantization" in m:
            r.fail(qpath, 'is only allowed with precision "int8"')
        return
    q = r.at(m, "quantization", path)
    if not isinstance(q, dict):
        r.fail(qpath, "must be an object")
    method = r.str(q, "method", qpath)
    if method not in ("dynamic", "static"):
        r.fail(f"{qpath}.method", f'must be "dynamic" or "static", got {json.dumps(method)}')
    r.boolean(q, "per_channel", qpath)
    if not r.strings(q, "op_types", qpath):
        r.fail(f"{qpath}.op_types", "must name at least one op type")
    r.integer(q, "nodes_quantized", qpath, 1)
    r.str(q, "onnxruntime_version", qpath)


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    num_train_timesteps: int
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float
    variance_type: str
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    samplers: tuple[SamplerSpec, ...]
    default_sampler: str

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> "Schedule":
        """The manifest's `scheduler` object, checked by the manifest rules."""
        _validate_scheduler(_Reader(where), d, "scheduler")
        return cls(int(d["num_train_timesteps"]), str(d.get("prediction_type", "epsilon")), bool(d["clip_sample"]),
                   float(d["clip_sample_range"]), str(d["variance_type"]),
                   np.asarray(d["betas"], dtype=np.float64), np.asarray(d["alphas_cumprod"], dtype=np.float64),
                   tuple(SamplerSpec.from_dict(s) for s in d["samplers"]), str(d["default_sampler"]))

    def find(self, sampler: str | None = None, steps: int | None = None) -> SamplerSpec:
        """The listed sampler for (kind, K), resolved by the one rule (dpkit.sampling_args.resolve_sampler):
        no kind: the default sampler's kind; no K: the default sampler when it is of that kind, else the
        kind's largest K."""
        default = next(s for s in self.samplers if s.name == self.default_sampler)
        largest: dict[str, int] = {}
        for s in self.samplers:
            largest[s.sampler] = max(largest.get(s.sampler, 0), s.num_inference_steps)
        kind, k = resolve_sampler(sampler, steps, default=(default.sampler, default.num_inference_steps),
                                  largest=largest)
        for s in self.samplers:
            if s.sampler == kind and s.num_inference_steps == k:
                return s
        names = ", ".join(s.name for s in self.samplers)
        raise DpkitError(f"the bundle has no sampler {kind} with steps={steps} (available: {names})")

    def trajectory_checks(self) -> list[tuple[str, SamplerSpec]]:
        """The whole-trajectory checks an export runs (fp32/fp16 parity, the int8 error bound), as
        (check name, sampler): a diffusion policy's DDPM with all num_train_timesteps steps and its DDIM (the
        default sampler when that is DDIM, else ddim-10, else the largest listed DDIM); a few-step student's
        fewstep with all its calls."""
        kinds = {s.sampler for s in self.samplers}
        if "fewstep" in kinds:
            return [("traj_fewstep", self.find("fewstep"))]
        default = self.find()
        listed_10 = any(s.sampler == "ddim" and s.num_inference_steps == 10 for s in self.samplers)
        ddim = default if default.sampler == "ddim" else self.find("ddim", 10 if listed_10 else None)
        return [("traj_ddpm", self.find("ddpm", self.num_train_timesteps)), ("traj_ddim", ddim)]


# --------------------------------------------------------------------------- bundle


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    schedule: Schedule
    observations: list[dict[str, Any]]
    action_scale: np.ndarray
    action_offset: np.ndarray
    graph_files: dict[str, Path] = field(default_factory=dict)

    # Shape constants, straight from the manifest (validated by load_bundle).
    obs_mode = property(lambda self: self.manifest["obs_mode"])
    n_obs_steps = property(lambda self: self.manifest["n_obs_steps"])
    horizon = property(lambda self: self.manifest["horizon"])
    n_action_steps = property(lambda self: self.manifest["n_action_steps"])
    action_dim = property(lambda self: self.manifest["action_dim"])
    first_action_index = property(lambda self: self.manifest["first_action_index"])
    cond_dim = property(lambda self: self.manifest["cond_dim"])
    # The denoiser's precision ("fp32", "fp16", "int8"): the graph run K times per chunk.
    precision = property(lambda self: model_precision(self.manifest["models"]["denoiser"]))

    @property
    def obs_keys(self) -> tuple[str, ...]:
        return tuple(o["name"] for o in self.observations)



# --------------------------------------------------------------------------- TensorRT

# Where TensorRT engines live inside a bundle (the manifest's `tensorrt.cache_dir` as dpkit-export writes it).
TRT_CACHE_DIR = "trt_cache"


def trt_profile_inputs(manifest: dict[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per graph, per input: the shape without batch (batch is a TensorRT profile's only dynamic dim)."""
    to, h, a, c = manifest["n_obs_steps"], manifest["horizon"], manifest["action_dim"], manifest["cond_dim"]
    enc = {o["name"]: (to, *o["shape"]) for o in manifest["observations"]}
    den = {"sample": (h, a), "timestep": (), "cond": (c,)}
    return {"encoder": enc, "denoiser": den}


def ort_trt_options(cache: Path, inputs: dict[str, tuple[int, ...]], trt: dict[str, Any] | None) -> dict[str, Any]:
    """TensorrtExecutionProvider options for one graph, from the manifest's `tensorrt` entry (the profile
    min_batch/opt_batch/max_batch and the precision, written once by dpkit-export). The exporter builds
    engines with them and every runtime (the "ort" backend, the C++ runtime) passes the same ones, so ORT
    finds the cached engines (it keys them on the precision and the profile). No entry: only the cache
    folder; ORT then builds an engine for each input shape it meets."""
    opts: dict[str, Any] = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    if not trt:
        return opts

    def dims(b: int) -> str:
        return ",".join(f"{n}:{'x'.join(str(d) for d in (b, *s))}" for n, s in inputs.items())

    opts.update({
        "trt_fp16_enable": trt["precision"] == "fp16",
        "trt_profile_min_shapes": dims(int(trt["min_batch"])),
        "trt_profile_opt_shapes": dims(int(trt["opt_batch"])),
        "trt_profile_max_shapes": dims(int(trt["max_batch"])),
    })
    return opts


def bundle_trt_options(bundle: "Bundle", graph: str) -> dict[str, Any]:
    """TensorRT options for `graph` ("encoder"/"denoiser") of a loaded bundle (see ort_trt_options)."""
    trt = bundle.manifest.get("tensorrt")
    cache = bundle.path / (trt["cache_dir"] if trt else TRT_CACHE_DIR)
    return ort_trt_options(cache, trt_profile_inputs(bundle.manifest)[graph], trt)


# --------------------------------------------------------------------------- files and graphs


def _shape_str(dims: tuple[int | None, ...] | list) -> str:
    return "(" + ", ".join("B" if d is None or d < 0 else str(d) for d in dims) + ")"


def expected_graph_io(manifest: dict[str, Any], graph: str) -> tuple[list, list]:
    """([(name, element type, dims)] inputs, outputs) the contract requires of `graph`; None = batch."""
    to, h, a, c = manifest["n_obs_steps"], manifest["horizon"], manifest["action_dim"], manifest["cond_dim"]
    if graph == "encoder":
        ins = [(o["name"], FLOAT, (None, to, *o["shape"])) for o in manifest["observations"]]
        return ins, [("cond", FLOAT, (None, c))]
    return ([("sample", FLOAT, (None, h, a)), ("timestep", INT64, (None,)), ("cond", FLOAT, (None, c))],
            [("noise_pred", FLOAT, (None, h, a))])


def graph_io_problem(manifest: dict[str, Any], graph: str, inputs: list, outputs: list) -> str | None:
    """What is wrong with a graph's declared inputs/outputs [(name, element type, dims)] (None: nothing).
    A None/negative dim in the graph is dynamic and accepts anything; the expected batch dim is None."""
    want_in, want_out = expected_graph_io(manifest, graph)
    if len(inputs) != len(want_in) or len(outputs) != len(want_out):
        return (f"has {len(inputs)} inputs and {len(outputs)} outputs, expected {len(want_in)} and "
                f"{len(want_out)} (policy.json)")
    for kind, got_list, want_list in (("input", inputs, want_in), ("output", outputs, want_out)):
        for i, ((name, elem, dims), (w_name, w_elem, w_dims)) in enumerate(zip(got_list, want_list)):
            if name != w_name:
                return f"{kind} {i} is named '{name}', expected '{w_name}'"
            if elem != w_elem:
                return (f"{kind} '{name}' has element type {DTYPE_NAMES.get(elem, str(elem))}, expected "
                        f"{DTYPE_NAMES[w_elem]}")
            ok = len(dims) == len(w_dims) and all(d is None or d < 0 or w is None or d == w for d, w in zip(dims, w_dims))
            if not ok:
                return f"{kind} '{name}' has shape {_shape_str(dims)}, expected {_shape_str(w_dims)}"
    return None


_ORT_TYPES = {"tensor(float)": FLOAT, "tensor(int64)": INT64, "tensor(float16)": 10, "tensor(double)": 11,
              "tensor(int32)": 6}


def check_graph_io(bundle: Bundle, graph: str, inputs: list, outputs: list) -> None:
    """Raise DpkitError unless an ONNX Runtime session's `get_inputs()` / `get_outputs()` for `graph`
    ("encoder" or "denoiser") are the contract's for this bundle (names in order, element types, fixed
    sizes: cond_dim, horizon, action_dim, observation shapes). load_bundle already checks the graph files
    themselves; a backend calls this on the sessions it opened (what the provider really loaded)."""
    def as_tuple(a: Any) -> tuple:
        if isinstance(a, tuple):
            return a
        dims = tuple(d if isinstance(d, int) else None for d in (a.shape or ()))
        return a.name, _ORT_TYPES.get(a.type, a.type), dims

    problem = graph_io_problem(bundle.manifest, graph, [as_tuple(i) for i in inputs], [as_tuple(o) for o in outputs])
    if problem:
        raise DpkitError(f"{bundle.path / MANIFEST}: models.{graph}.file {json.dumps(bundle.graph_files[graph].name)}: "
                         f"{problem}")


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def check_bundle_files(root: Path, manifest: dict[str, Any], where: str, verify_sha256: bool = True) -> dict[str, Path]:
    """The file rules (as cpp/src/manifest.cpp's load_manifest and verify_bundle_sha256): every file the
    manifest names is a regular file that stays inside the bundle folder (symlinks resolved); a graph
    references external data only through files its `external_data` lists; each graph's declared inputs
    and outputs are the manifest's; and (verify_sha256) the sha256 of each graph and external-data file.
    Returns the graph paths."""
    r = _Reader(where)
    files: dict[str, Path] = {}
    for g in GRAPHS:
        m = manifest["models"][g]
        named = [(f"models.{g}.file", m["file"])] + [
            (f"models.{g}.external_data[{i}].file", e["file"]) for i, e in enumerate(m.get("external_data", []))]
        for key, name in named:
            path = root / name
            if not path.exists():
                r.fail(key, f"{json.dumps(name)} does not exist in the bundle folder")
            if not _inside(root, path):
                r.fail(key, f"{json.dumps(name)} resolves outside the bundle folder")
            if not path.is_file():
                r.fail(key, f"{json.dumps(name)} is not a regular file")
        path = root / m["file"]
        try:
            info = read_onnx_info(path)
        except OnnxError as e:
            r.fail(f"models.{g}.file", f"{json.dumps(m['file'])} {e.reason}")
        listed = {e["file"] for e in m.get("external_data", [])}
        for loc in sorted(info.external - listed):
            r.fail(f"models.{g}.file", f"{json.dumps(m['file'])} references external data {json.dumps(loc)} that "
                                       f"models.{g}.external_data does not list (every byte a graph loads must be hashed)")
        problem = graph_io_problem(manifest, g, info.graph_inputs(), info.outputs)
        if problem:
            r.fail(f"models.{g}.file", f"{json.dumps(m['file'])}: {problem}")
        _check_graph_precision(r, m, g, info)
        files[g] = path
    if verify_sha256:
        for g in GRAPHS:
            m = manifest["models"][g]
            hashed = [(f"models.{g}.sha256", m["file"], m["sha256"])] + [
                (f"models.{g}.external_data[{i}].sha256", e["file"], e["sha256"])
                for i, e in enumerate(m.get("external_data", []))]
            for key, name, want in hashed:
                got = sha256_file(root / name)
                if got != want:
                    r.fail(key, f"does not match {name} (file has {got[:12]}..., policy.json says {want[:12]}...): "
                                "the file was modified or is corrupt; re-export the bundle")
    return files


def _check_graph_precision(r: _Reader, m: dict[str, Any], g: str, info) -> None:
    """The declared precision (models.<g>.precision, or the one dtype implies when absent) must be what the
    graph is (onnx_info.graph_precision): a label policy.json carries is not taken on trust."""
    derived, evidence = graph_precision(info)
    declared = model_precision(m)
    if precision_fits(declared, derived, info):
        return
    label = (json.dumps(declared) if "precision" in m
             else f"(missing; {json.dumps(declared)} from dtype {json.dumps(m['dtype'])})")
    r.fail(f"models.{g}.precision", f"{label} does not match the graph: {m['file']} is {derived} ({evidence})")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """policy.json of the bundle folder `path` (or the file itself), checked by every manifest rule."""
    path = Path(path)
    mpath = path / MANIFEST if path.is_dir() else path
    if not path.exists():
        raise DpkitError(f"bundle {path} does not exist")
    if not mpath.is_file():
        raise DpkitError(f"{path} is not a dpkit bundle (no {MANIFEST})")
    try:
        text = mpath.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DpkitError(f"{mpath}: not valid JSON ({e})") from None
    return parse_manifest(text, str(mpath))


def load_bundle(path: str | Path, verify_sha256: bool = True) -> Bundle:
    """Read policy.json, apply every manifest and file rule, and (by default) check every sha256."""
    manifest = read_manifest(path)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    where = str(root / MANIFEST)
    files = check_bundle_files(root, manifest, where, verify_sha256)
    norm = manifest["action_normalizer"]
    return Bundle(root, manifest, Schedule.from_dict(manifest["scheduler"], where), manifest["observations"],
                  np.asarray(norm["scale"], dtype=np.float64), np.asarray(norm["offset"], dtype=np.float64), files)
