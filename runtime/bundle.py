"""Read and validate a dpkit bundle (docs/bundle-format.md): manifest keys, format version, sha256, shapes.

    from dpkit.runtime.bundle import load_bundle
    b = load_bundle("bundles/tiny")        # raises DpkitError on any mismatch
    b.schedule.find("ddim", 10).timesteps

Needs only numpy: this is what a runtime-only install reads. `validate_obs` is the one check of caller
observations against a bundle's `observations` spec, shared by every Python backend.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.errors import DpkitError

FORMAT = "dpkit-bundle"
FORMAT_VERSION = 1
MANIFEST = "policy.json"
GRAPHS = ("encoder", "denoiser")


# --------------------------------------------------------------------------- observations


def validate_obs(obs: Any, spec: list[dict[str, Any]], n_obs_steps: int) -> tuple[dict[str, np.ndarray], int]:
    """Check an observation dict against the spec; return contiguous float32 arrays and the batch size."""
    if not isinstance(obs, dict):
        raise DpkitError(f"obs must be a dict of numpy arrays, got {type(obs).__name__}")
    names = [o["name"] for o in spec]
    unknown = sorted(set(obs) - set(names))
    missing = [n for n in names if n not in obs]
    if missing or unknown:
        raise DpkitError(f"obs keys {sorted(obs)} do not match the policy's {names}"
                         + (f" (missing {missing})" if missing else "") + (f" (unknown {unknown})" if unknown else ""))
    out: dict[str, np.ndarray] = {}
    batch = None
    for o in spec:
        name, arr = o["name"], obs[o["name"]]
        if hasattr(arr, "detach"):  # a torch tensor: accept it, the contract is numpy
            arr = arr.detach().cpu().numpy()
        arr = np.asarray(arr)
        want = (n_obs_steps, *o["shape"])
        if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != want:
            raise DpkitError(f"obs[{name!r}] has shape {tuple(arr.shape)}, expected (B, {', '.join(map(str, want))})")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DpkitError(f"obs[{name!r}] has dtype {arr.dtype}, expected {o['dtype']}")
        if arr.shape[0] < 1:
            raise DpkitError(f"obs[{name!r}] has batch size 0")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise DpkitError(f"obs[{name!r}] has batch size {arr.shape[0]}, other inputs have {batch}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise DpkitError(f"obs[{name!r}] contains NaN or Inf")
        out[name] = arr
    return out, int(batch)


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    sampler: str  # "ddpm" or "ddim"
    num_inference_steps: int
    timesteps: tuple[int, ...]
    prev_timesteps: tuple[int, ...]
    final_alpha_cumprod: float
    eta: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any], num_train: int) -> "SamplerSpec":
        s = cls(
            name=str(_get(d, "name", "scheduler.samplers[]")),
            sampler=str(_get(d, "sampler", "scheduler.samplers[]")),
            num_inference_steps=int(_get(d, "num_inference_steps", "scheduler.samplers[]")),
            timesteps=tuple(int(t) for t in _get(d, "timesteps", "scheduler.samplers[]")),
            prev_timesteps=tuple(int(t) for t in _get(d, "prev_timesteps", "scheduler.samplers[]")),
            final_alpha_cumprod=float(_get(d, "final_alpha_cumprod", "scheduler.samplers[]")),
            eta=float(d.get("eta", 0.0)),
        )
        where = f"scheduler sampler {s.name!r}"
        _require(s.sampler in ("ddpm", "ddim"), f"{where}: sampler must be ddpm or ddim, got {s.sampler!r}")
        k = s.num_inference_steps
        _require(k >= 1 and len(s.timesteps) == k and len(s.prev_timesteps) == k,
                 f"{where}: needs {k} timesteps and prev_timesteps")
        _require(all(0 <= t < num_train for t in s.timesteps), f"{where}: timesteps outside [0, {num_train})")
        _require(all(-1 <= p < num_train for p in s.prev_timesteps), f"{where}: prev_timesteps outside [-1, {num_train})")
        _require(0.0 < s.final_alpha_cumprod <= 1.0, f"{where}: final_alpha_cumprod must be in (0, 1]")
        return s


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
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        n = int(_get(d, "num_train_timesteps", "scheduler"))
        betas = np.asarray(_get(d, "betas", "scheduler"), dtype=np.float64)
        acp = np.asarray(_get(d, "alphas_cumprod", "scheduler"), dtype=np.float64)
        _require(betas.shape == (n,) and acp.shape == (n,), f"scheduler: betas and alphas_cumprod need length {n}")
        _require(bool(np.all((acp > 0) & (acp <= 1))), "scheduler: alphas_cumprod must lie in (0, 1]")
        pred = str(_get(d, "prediction_type", "scheduler"))
        _require(pred == "epsilon", f"scheduler: prediction_type {pred!r} is not supported (format 1: epsilon)")
        var = str(d.get("variance_type", "fixed_small"))
        _require(var == "fixed_small", f"scheduler: variance_type {var!r} is not supported (format 1: fixed_small)")
        samplers = tuple(SamplerSpec.from_dict(s, n) for s in _get(d, "samplers", "scheduler"))
        _require(len(samplers) > 0, "scheduler: samplers is empty")
        sched = cls(n, pred, bool(_get(d, "clip_sample", "scheduler")), float(d.get("clip_sample_range", 1.0)),
                    var, betas, acp, samplers, str(_get(d, "default_sampler", "scheduler")))
        _require(any(s.name == sched.default_sampler for s in samplers),
                 f"scheduler: default_sampler {sched.default_sampler!r} is not among the samplers")
        return sched

    def find(self, sampler: str | None = None, steps: int | None = None) -> SamplerSpec:
        """The listed sampler for (kind, K). No kind: the default sampler's kind (as the torch backend);
        no K: the default sampler when it is of that kind, else the kind's largest K."""
        default = next(s for s in self.samplers if s.name == self.default_sampler)
        if sampler is None:
            sampler = default.sampler
        if sampler not in ("ddpm", "ddim"):
            raise DpkitError(f"unknown sampler {sampler!r} (expected 'ddpm' or 'ddim')")
        kinds = [s for s in self.samplers if s.sampler == sampler]
        if steps is None:
            if default in kinds:
                return default
            return max(kinds, key=lambda s: s.num_inference_steps) if kinds else self._missing(sampler, steps)
        for s in kinds:
            if s.num_inference_steps == int(steps):
                return s
        return self._missing(sampler, steps)

    def _missing(self, sampler: str | None, steps: int | None) -> SamplerSpec:
        names = ", ".join(s.name for s in self.samplers)
        raise DpkitError(f"the bundle has no sampler {sampler or 'any'} with steps={steps} (available: {names})")


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

    @property
    def obs_keys(self) -> tuple[str, ...]:
        return tuple(o["name"] for o in self.observations)

    def unnormalize_actions(self, traj: np.ndarray) -> np.ndarray:
        """(B, H, A) normalized trajectory -> (B, Ta, A) executed actions in environment units."""
        i = self.first_action_index
        return traj[:, i : i + self.n_action_steps] * self.action_scale.astype(np.float32) + self.action_offset.astype(np.float32)


# Where TensorRT engines live inside a bundle (the manifest's `tensorrt.cache_dir` as dpkit-export writes it).
TRT_CACHE_DIR = "trt_cache"


def trt_profile_inputs(manifest: dict[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per graph, per input: the shape without batch (batch is a TensorRT profile's only dynamic dim)."""
    to, h, a, c = manifest["n_obs_steps"], manifest["horizon"], manifest["action_dim"], manifest["cond_dim"]
    enc = {o["name"]: (to, *o["shape"]) for o in manifest["observations"]}
    den = {"sample": (h, a), "timestep": (), "cond": (c,)}
    return {"encoder": enc, "denoiser": den}


def ort_trt_options(cache: Path, inputs: dict[str, tuple[int, ...]], max_batch: int, fp16: bool) -> dict[str, Any]:
    """TensorrtExecutionProvider options for one graph. The exporter builds engines with them and every
    runtime (this package's "ort" backend, the C++ runtime) passes the same ones to reuse the cached engines:
    ORT keys its cache on the precision and the min/opt/max profile (batch 1..max_batch, opt min(8, max))."""
    def dims(b: int) -> str:
        return ",".join(f"{n}:{'x'.join(str(d) for d in (b, *s))}" for n, s in inputs.items())

    opt = max(1, min(8, max_batch))
    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_fp16_enable": fp16,
        "trt_profile_min_shapes": dims(1),
        "trt_profile_opt_shapes": dims(opt),
        "trt_profile_max_shapes": dims(max_batch),
    }


def bundle_trt_options(bundle: "Bundle", graph: str) -> dict[str, Any]:
    """TensorRT options for `graph` ("encoder"/"denoiser"): those of the bundle's exported engines, or (no
    engines exported) an engine cache in the bundle's trt_cache/ that ORT fills at the first load."""
    trt = bundle.manifest.get("tensorrt")
    if not trt:
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(bundle.path / TRT_CACHE_DIR)}
    return ort_trt_options(bundle.path / trt.get("cache_dir", TRT_CACHE_DIR), trt_profile_inputs(bundle.manifest)[graph],
                           int(trt["max_batch"]), trt.get("precision") == "fp16")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST if path.is_dir() else path
    if not path.exists():
        raise DpkitError(f"bundle {path} does not exist")
    if not mpath.is_file():
        raise DpkitError(f"{path} is not a dpkit bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DpkitError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DpkitError(f"{mpath} is not a dpkit bundle manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DpkitError(f"{mpath} has format_version {version!r}; this dpkit reads version {FORMAT_VERSION} "
                         "(re-export the checkpoint with this dpkit's dpkit-export)")
    return manifest


def load_bundle(path: str | Path, verify_sha256: bool = True) -> Bundle:
    """Read policy.json, check its keys and shapes, and (by default) the sha256 of both graphs."""
    manifest = read_manifest(path)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    where = str(root / MANIFEST)
    for key in ("obs_mode", "n_obs_steps", "horizon", "n_action_steps", "action_dim", "first_action_index",
                "cond_dim", "observations", "action_normalizer", "scheduler", "models"):
        _get(manifest, key, where)
    ints = {k: manifest[k] for k in ("n_obs_steps", "horizon", "n_action_steps", "action_dim", "cond_dim")}
    for k, v in ints.items():
        _require(isinstance(v, int) and v >= 1, f"{where}: {k} must be a positive integer, got {v!r}")
    _require(manifest["first_action_index"] == manifest["n_obs_steps"] - 1,
             f"{where}: first_action_index must be n_obs_steps - 1")
    _require(manifest["first_action_index"] + manifest["n_action_steps"] <= manifest["horizon"],
             f"{where}: first_action_index + n_action_steps exceeds horizon")
    _require(manifest["obs_mode"] in ("image", "lowdim"), f"{where}: unknown obs_mode {manifest['obs_mode']!r}")
    obs = manifest["observations"]
    _require(isinstance(obs, list) and len(obs) > 0 and all(isinstance(o, dict) and {"name", "shape", "dtype"} <= set(o) for o in obs),
             f"{where}: observations must be a list of {{name, shape, dtype}}")
    norm = manifest["action_normalizer"]
    scale = np.asarray(_get(norm, "scale", where + " action_normalizer"), dtype=np.float64)
    offset = np.asarray(_get(norm, "offset", where + " action_normalizer"), dtype=np.float64)
    a = manifest["action_dim"]
    _require(scale.shape == (a,) and offset.shape == (a,), f"{where}: action_normalizer scale/offset need length {a}")
    try:
        schedule = Schedule.from_dict(manifest["scheduler"])
    except (TypeError, ValueError) as e:
        raise DpkitError(f"{where}: malformed scheduler: {e}") from None

    files: dict[str, Path] = {}
    for g in GRAPHS:
        m = _get(manifest["models"], g, where + " models")
        f = root / str(_get(m, "file", f"{where} models.{g}"))
        if not f.is_file():
            raise DpkitError(f"bundle {root}: {g} graph {f.name} is missing")
        if verify_sha256:
            want = str(_get(m, "sha256", f"{where} models.{g}"))
            got = sha256_file(f)
            if got != want:
                raise DpkitError(f"bundle {root}: {f.name} sha256 {got[:12]}... does not match policy.json "
                                 f"({want[:12]}...): the file was modified or is corrupt")
        files[g] = f
    return Bundle(root, manifest, schedule, obs, scale, offset, files)


def _get(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise DpkitError(f"{where}: missing key {key!r}")
    return d[key]


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise DpkitError(msg)


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: store a non-finite measurement as null."""
    return float(x) if math.isfinite(x) else None
