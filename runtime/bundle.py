"""The bundle as Python sees it: a typed view over what the one bundle reader accepted (docs/bundle-format.md).

    from dpkit.runtime.bundle import load_bundle
    b = load_bundle("bundles/tiny")        # raises DpkitError on any mismatch
    b.schedule.find("ddim", 10).timesteps

The reader is C++ (cpp/src/manifest.cpp), reached through the pybind module dpkit.runtime._core that every
install of dpkit builds: it reads policy.json once, applies every manifest and file rule (graph inputs and
outputs, precision, sha256) without opening an ONNX Runtime session, and hands back the document it checked.
This module only builds dataclasses from that document; it re-checks nothing. The damaged bundles the reader
refuses are the table cpp/tests/data/damaged_bundles.json. Caller observations are checked by the backends
(dpkit.runtime.backend.validate_observations).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.errors import DpkitError
from dpkit.sampling import SamplerSpec
from dpkit.sampling_args import resolve_sampler

FORMAT = "dpkit-bundle"  # what the exporter writes (dpkit.export.writer); the reader checks them
FORMAT_VERSION = 1
MANIFEST = "policy.json"
GRAPHS = ("encoder", "denoiser")
PRECISIONS = ("fp32", "fp16", "int8")  # what dpkit-export --precision offers (docs/bundle-format.md, "Precision")

# ONNX TensorProto.DataType values of the graph contract (the "ort" backend's check of its sessions).
FLOAT, INT64 = 1, 7
DTYPE_NAMES = {FLOAT: "float32", INT64: "int64", 10: "float16", 11: "float64", 6: "int32"}


# --------------------------------------------------------------------------- the reader (C++)


def _core():
    """The compiled module, or one DpkitError line saying how to build it."""
    try:
        from dpkit.runtime import _core as core
    except ImportError as e:
        raise DpkitError(f"the bundle reader (the compiled module dpkit.runtime._core) is not available in this "
                         f"install ({e}); build dpkit with its C++ extension: `pip install .` (or `make install` "
                         "in a source checkout)") from None
    return core


def limits() -> dict[str, int]:
    """The reader's size limits by name (docs/bundle-format.md, "Limits"), e.g. limits()["max_trt_batch"]."""
    return dict(_core().bundle_limits())


def onnx_info(path: str | Path) -> dict[str, Any]:
    """What the reader knows of an .onnx file (its protobuf walk, no ONNX Runtime): `inputs` (initializers
    excluded) and `outputs` as [(name, element type, dims with None = dynamic)], `external` (the data files
    its tensors reference), `op_types` and `tensor_types` counts, and the `precision` it derives ("fp32",
    "fp16", "int8") with the `evidence`."""
    return _core().read_onnx_info(str(path))


def _root(path: str | Path) -> Path:
    """The bundle folder of `path` (the folder itself, or its policy.json)."""
    path = Path(path)
    return path.parent if path.name == MANIFEST and path.is_file() else path


def _read(path: str | Path, verify_sha256: bool, check_files: bool) -> tuple[Path, dict[str, Any]]:
    root = _root(path)
    core = _core()
    return root, json.loads(core.read_bundle(str(root), verify_sha256=verify_sha256, check_files=check_files))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """policy.json of the bundle folder `path` (or the file itself), checked by every manifest rule (not the
    files it names: load_bundle checks those)."""
    return _read(path, verify_sha256=False, check_files=False)[1]


def load_bundle(path: str | Path, verify_sha256: bool = True) -> Bundle:
    """The bundle at `path` after the reader applied every manifest and file rule and (by default) checked
    every sha256; raises DpkitError (one line naming policy.json and the key) on any mismatch."""
    root, manifest = _read(path, verify_sha256=verify_sha256, check_files=True)
    norm, models = manifest["action_normalizer"], manifest["models"]
    return Bundle(root, manifest, Schedule.from_dict(manifest["scheduler"]), manifest["observations"],
                  np.asarray(norm["scale"], dtype=np.float64), np.asarray(norm["offset"], dtype=np.float64),
                  {g: root / models[g]["file"] for g in GRAPHS})


def model_precision(m: dict[str, Any]) -> str:
    """A models.<graph> entry's precision: its `precision`, else the one its dtype implies (bundles written
    before int8 existed have no `precision`)."""
    return m.get("precision", "fp16" if m["dtype"] == "float16" else "fp32")


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
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        """The `scheduler` object of a policy.json the reader accepted (or that dpkit.export.schedule built);
        not checked again here. An absent prediction_type is "epsilon" (bundles from before "sample")."""
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

    # Shape constants, straight from the manifest (the reader checked them).
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


# --------------------------------------------------------------------------- sessions


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
    sizes: cond_dim, horizon, action_dim, observation shapes). The reader already checked the graph files
    themselves (same wording: cpp/src/manifest.cpp, graph_io_problem); a backend calls this on the sessions
    it opened (what the provider really loaded)."""
    def as_tuple(a: Any) -> tuple:
        if isinstance(a, tuple):
            return a
        dims = tuple(d if isinstance(d, int) else None for d in (a.shape or ()))
        return a.name, _ORT_TYPES.get(a.type, a.type), dims

    problem = graph_io_problem(bundle.manifest, graph, [as_tuple(i) for i in inputs], [as_tuple(o) for o in outputs])
    if problem:
        raise DpkitError(f"{bundle.path / MANIFEST}: models.{graph}.file {json.dumps(bundle.graph_files[graph].name)}: "
                         f"{problem}")
