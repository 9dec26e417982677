"""The one Python backend contract: what every `load_policy` backend is, and the work they share.

    from dpkit.runtime import load_policy
    policy = load_policy("bundles/tiny", backend="ort")              # a PolicyBackend
    traj = policy.sample(obs, sampler="ddim", steps=10, seed=0)      # (B, H, A) normalized
    actions = policy.predict_action(obs, seed=0)                     # (B, Ta, A) environment units

`PolicyBackend` owns everything that is not a network call — argument checks, observation validation,
sampler resolution (through the shared rule in dpkit.sampling_args), noise drawing and the executed
action slice — so "torch", "ort" and "cpp" agree by construction. A backend implements two hooks:

  `_find(kind, K)`   -> SamplerChoice: the sampler it will run for an already-resolved (kind, K)
  `_run(arrays, batch, choice, initial_noise, step_noise, inpaint)` -> the (B, H, A) normalized trajectory

Noise: given `seed`, the initial and per-step noise are drawn here from numpy's generator in a fixed order,
so every backend given one seed samples the same trajectory. Without a seed or injected noise, a backend
that has its own generator (cpp, allocation-free in C++) draws it there.

Parts, for timing them apart (dpkit-bench): `provider` (where the networks run, the C++ runtime's names),
`encoder_call(obs)` / `denoiser_call(obs)` (a no-argument call of one network on prepared inputs, or None
when the backend does not expose it), `sync()` (wait for queued device work) and `last_loop_ms` (the
backend's own measure of its last chunk's time outside the networks, or None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from dpkit.errors import InputError

#: The providers of the C++ runtime (PolicyParams::provider) -> the ONNX Runtime provider list each means.
#: "tensorrt" keeps CUDA behind it for the nodes TensorRT does not take, as ONNX Runtime recommends.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
}
ORT_NAMES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}


def provider_name(ort_provider: Any) -> str | None:
    """An ONNX Runtime provider entry (a name, or a (name, options) pair) -> "cpu" | "cuda" | "tensorrt"."""
    name = ort_provider[0] if isinstance(ort_provider, (tuple, list)) else ort_provider
    return ORT_NAMES.get(name) if isinstance(name, str) else None


def resolve_provider(provider: str | None, providers: Sequence[Any] | None) -> str | None:
    """One answer from the two spellings of where the networks run: `provider` (the C++ runtime's name:
    "cpu", "cuda", "tensorrt") and the older ONNX Runtime list `providers` (its first entry decides).
    None when neither is given; InputError when one is unknown or they disagree."""
    if provider is not None and (not isinstance(provider, str) or provider not in PROVIDERS):
        raise InputError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if not providers:
        return provider
    if isinstance(providers, str):
        providers = [providers]
    if not isinstance(providers, (list, tuple)):
        raise InputError(f"providers must be a list of ONNX Runtime provider names, got {providers!r}")
    first = provider_name(providers[0])
    if first is None:
        raise InputError(f"providers[0] {providers[0]!r} is not one of {', '.join(ORT_NAMES)}")
    if provider is not None and provider != first:
        raise InputError(f"provider={provider!r} and providers={list(providers)!r} disagree")
    return first
from dpkit.runtime.sampling import Inpaint, draw_noise
from dpkit.sampling_args import check_sampler, check_seed, check_steps


@dataclass(frozen=True)
class SamplerChoice:
    """The sampler one call runs: its listed name, kind, K, and a backend-specific handle."""

    name: str
    sampler: str
    num_inference_steps: int
    uses_step_noise: bool
    handle: Any = None


@dataclass(frozen=True)
class PolicySpec:
    """Shapes and the action normalizer every backend exposes (from the bundle, or the training config)."""

    obs_mode: str
    n_obs_steps: int
    horizon: int
    n_action_steps: int
    action_dim: int
    first_action_index: int
    observations: tuple[dict[str, Any], ...]  # [{name, shape, dtype}] in encoder input order
    action_scale: np.ndarray
    action_offset: np.ndarray

    @classmethod
    def from_bundle(cls, bundle: Any) -> "PolicySpec":
        """The spec a bundle's policy.json describes (dpkit.runtime.bundle.Bundle, already validated)."""
        m = bundle.manifest
        return cls(m["obs_mode"], m["n_obs_steps"], m["horizon"], m["n_action_steps"], m["action_dim"],
                   m["first_action_index"], tuple(bundle.observations), np.asarray(bundle.action_scale),
                   np.asarray(bundle.action_offset))


class PolicyBackend:
    """Base of the "torch", "ort" and "cpp" backends (see the module docstring)."""

    backend: str = ""
    #: Largest batch one call takes (None: no limit); evaluation sizes its vectorized batch by it.
    max_batch: int | None = None
    #: True when the backend's own generator draws noise that is neither injected nor seeded.
    draws_own_noise: bool = False
    #: True when the backend checks observation shapes and NaN/Inf itself (the C++ runtime does).
    checks_obs_values: bool = False
    #: Where the networks run: "cpu", "cuda" or "tensorrt" (the C++ runtime's names).
    provider: str = "cpu"

    def __init__(self, spec: PolicySpec):
        self.spec = spec

    # The interface's attributes, straight from the spec.
    obs_mode = property(lambda self: self.spec.obs_mode)
    n_obs_steps = property(lambda self: self.spec.n_obs_steps)
    horizon = property(lambda self: self.spec.horizon)
    n_action_steps = property(lambda self: self.spec.n_action_steps)
    action_dim = property(lambda self: self.spec.action_dim)
    observations = property(lambda self: list(self.spec.observations))
    obs_keys = property(lambda self: tuple(o["name"] for o in self.spec.observations))

    # ---- the interface ------------------------------------------------------------------------------

    def resolve_sampler(self, sampler: str | None = None, steps: int | None = None, *,
                        num_inference_steps: int | None = None) -> SamplerChoice:
        """The sampler `sample(obs, sampler=..., steps=...)` runs (DpkitError when the backend lacks it)."""
        return self._find(check_sampler(sampler), check_steps(steps, num_inference_steps))

    def sample(self, obs: dict[str, Any], sampler: str | None = None, steps: int | None = None, *,
               num_inference_steps: int | None = None, initial_noise: Any = None, step_noise: Any = None,
               seed: int | None = None, prefix: Any = None, prefix_start: int | None = None,
               prefix_weights: Any = None) -> np.ndarray:
        """(B, H, A) normalized trajectory. `steps` (alias `num_inference_steps`) is K; injected noise:
        initial (B, H, A), per step (K, B, H, A) (only DDPM uses it); `seed` draws both reproducibly.

        `prefix` (B, P, A), normalized: a committed prefix the trajectory continues (inpainting, see
        dpkit.runtime.sampling.Inpaint) at rows `prefix_start` (default: the first executed action) on,
        with optional per-row `prefix_weights` (P,) in [0, 1] (default 1: hard)."""
        choice = self.resolve_sampler(sampler, steps, num_inference_steps=num_inference_steps)
        seed = check_seed(seed)
        arrays, batch = self.check_obs(obs)
        # With no seed, a backend with its own generator (cpp) draws what is not injected; else numpy does.
        fill = seed is not None or not self.draws_own_noise
        initial_noise, step_noise = draw_noise((batch, self.horizon, self.action_dim), choice.num_inference_steps,
                                               choice.uses_step_noise, initial_noise, step_noise, seed, fill=fill)
        inpaint = None
        if prefix is not None:
            start = self.spec.first_action_index if prefix_start is None else prefix_start
            inpaint = Inpaint.check(prefix, start, prefix_weights, (batch, self.horizon, self.action_dim))
        elif prefix_start is not None or prefix_weights is not None:
            raise InputError("prefix_start / prefix_weights given without a prefix")
        traj = self._run(arrays, batch, choice, initial_noise, step_noise, inpaint)
        return np.asarray(traj, dtype=np.float32)

    def predict_action(self, obs: dict[str, Any], sampler: str | None = None, steps: int | None = None, *,
                       num_inference_steps: int | None = None, initial_noise: Any = None, step_noise: Any = None,
                       seed: int | None = None, prefix: Any = None, prefix_weights: Any = None) -> np.ndarray:
        """(B, Ta, A) actions in environment units: the executed slice of `sample`, un-normalized.
        `prefix` (B, P, A) in environment units: the actions that will execute first (inpainted)."""
        if prefix is not None:
            prefix = self.normalize_actions(prefix)
        traj = self.sample(obs, sampler, steps, num_inference_steps=num_inference_steps, initial_noise=initial_noise,
                           step_noise=step_noise, seed=seed, prefix=prefix, prefix_weights=prefix_weights)
        return self.executed_actions(traj)

    def normalize_actions(self, actions: Any) -> np.ndarray:
        """Environment units -> the normalized trajectory space (the inverse of the action normalizer)."""
        try:
            a = np.asarray(actions, dtype=np.float64)
        except (ValueError, TypeError) as e:
            raise InputError(f"actions must be a float array ({str(e).splitlines()[0]})") from None
        return ((a - self.spec.action_offset) / self.spec.action_scale).astype(np.float32)

    def executed_actions(self, traj: np.ndarray) -> np.ndarray:
        """(B, H, A) normalized trajectory -> (B, Ta, A) executed actions in environment units."""
        s = self.spec
        i = s.first_action_index
        return (traj[:, i : i + s.n_action_steps] * s.action_scale.astype(np.float32)
                + s.action_offset.astype(np.float32))

    def check_obs(self, obs: Any) -> tuple[dict[str, np.ndarray], int]:
        """Observation dict -> C-contiguous float32 arrays in encoder order, and the batch size."""
        return validate_observations(obs, self.spec.observations, self.n_obs_steps,
                                     check_values=not self.checks_obs_values)

    # ---- parts, for timing them apart (dpkit-bench) ---------------------------------------------------

    def encoder_call(self, obs: dict[str, Any]) -> Callable[[], Any] | None:
        """A no-argument call of the observation encoder on `obs`, or None when the backend does not expose
        its encoder (cpp: it times its networks itself, see `last_loop_ms`)."""
        return None

    def denoiser_call(self, obs: dict[str, Any], timestep: int = 50, seed: int = 0) -> Callable[[], Any] | None:
        """A no-argument call of one denoiser step at `obs`'s batch (inputs prepared once: the condition from
        `obs`, a seeded sample, `timestep`), or None when the backend does not expose its denoiser."""
        return None

    def sync(self) -> None:
        """Wait until queued device work is done, so a timer around a call measures it (no-op on CPU)."""

    @property
    def last_loop_ms(self) -> float | None:
        """The backend's own measure of its last chunk's time outside the networks (ms), or None."""
        return None

    # ---- the backend's part ---------------------------------------------------------------------------

    def _find(self, sampler: str | None, steps: int | None) -> SamplerChoice:
        raise NotImplementedError

    def _run(self, arrays: dict[str, np.ndarray], batch: int, choice: SamplerChoice,
             initial_noise: np.ndarray | None, step_noise: np.ndarray | None, inpaint: Inpaint | None) -> np.ndarray:
        raise NotImplementedError


def validate_observations(obs: Any, spec: Sequence[dict[str, Any]], n_obs_steps: int,
                          check_values: bool = True) -> tuple[dict[str, np.ndarray], int]:
    """Check an observation dict against the spec; return contiguous float32 arrays and the batch size.

    `check_values=False` leaves the shape and NaN/Inf checks to a backend that makes them itself (C++)."""
    if not isinstance(obs, dict):
        raise InputError(f"obs must be a dict of numpy arrays, got {type(obs).__name__}")
    names = [o["name"] for o in spec]
    unknown = sorted(map(str, set(obs) - set(names)))
    missing = [n for n in names if n not in obs]
    if missing or unknown:
        raise InputError(f"obs keys {sorted(map(str, obs))} do not match the policy's {names}"
                         + (f" (missing {missing})" if missing else "") + (f" (unknown {unknown})" if unknown else ""))
    out: dict[str, np.ndarray] = {}
    batch = None
    for o in spec:
        name, arr = o["name"], obs[o["name"]]
        if hasattr(arr, "detach"):  # a torch tensor: accept it, the contract is numpy
            arr = arr.detach().cpu().numpy()
        try:
            arr = np.asarray(arr)
        except ValueError as e:  # a ragged nested list
            raise InputError(f"obs[{name!r}] is not a rectangular array ({str(e).splitlines()[0]})") from None
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) \
                or arr.dtype == np.bool_:
            raise InputError(f"obs[{name!r}] has dtype {arr.dtype}, expected {o['dtype']} (or another real number type)")
        want = (n_obs_steps, *o["shape"])
        if check_values and (arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != want):
            raise InputError(f"obs[{name!r}] has shape {tuple(arr.shape)}, expected (B, {', '.join(map(str, want))})")
        if arr.ndim == 0 or arr.shape[0] < 1:
            raise InputError(f"obs[{name!r}] has shape {tuple(arr.shape)}: no batch dimension or batch size 0")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise InputError(f"obs[{name!r}] has batch size {arr.shape[0]}, other inputs have {batch}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if check_values and not np.all(np.isfinite(arr)):
            raise InputError(f"obs[{name!r}] contains NaN or Inf")
        out[name] = arr
    return out, int(batch)
