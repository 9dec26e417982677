"""The "ort" backend: the bundle's two ONNX graphs in ONNX Runtime, driven by the numpy reverse loop.

    from dpkit.runtime import load_policy
    policy = load_policy("bundles/tiny", backend="ort")      # provider="cpu", allow_spinning=False: C++'s names
    traj = policy.sample(obs, sampler="ddim", steps=10, seed=0)     # (B, H, A), normalized

The schedule comes from policy.json only (never diffusers), so this backend is the reference the C++
runtime is checked against, and what `dpkit-export` verifies the graphs with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.errors import DpkitError
from dpkit.runtime.backend import PROVIDERS, PolicyBackend, PolicySpec, SamplerChoice, provider_name, resolve_provider
from dpkit.runtime.bundle import Bundle, bundle_trt_options, check_graph_io, load_bundle
from dpkit.runtime.sampling import StepPlan, run_reverse
from dpkit.threads import bundle_params, choose_threads, parse_threads, resolve_spin


def make_session(path: str | Path, providers: list[Any] | None = None, threads: int | None = None,
                 spin: bool = False):
    """An ORT InferenceSession on CPU by default; raises DpkitError when the file cannot be loaded.

    `threads`: intra-op threads (None or 0: ORT's own default). Idle pool threads busy-wait only with
    `spin=True`: spinning threads steal the CPU from a descheduled sibling on a shared machine, and from
    PyTorch when ORT alternates with it in one process (dpkit.threads has the measurements).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.log_severity_level = 3  # keep ORT's own warnings (e.g. provider fallbacks) out of user output
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DpkitError(f"ONNX Runtime cannot load {path}: {first}") from None


class OrtPolicy(PolicyBackend):
    backend = "ort"

    def __init__(self, bundle: str | Path | Bundle, providers: list[Any] | None = None,
                 threads: int | None = None, verify_sha256: bool = True, spin: bool | None = None, *,
                 allow_spinning: bool | None = None, provider: str | None = None):
        """`provider`: "cpu" (default), "cuda" or "tensorrt", the C++ runtime's names; like C++, one that ONNX
        Runtime does not load here is a DpkitError, never a fallback. `providers` (the older spelling): an
        ONNX Runtime provider list, used as given (ONNX Runtime may fall back to CPU; `self.providers` says).
        `threads`: intra-op threads per session (None or 0: dpkit.threads' choice for this bundle's size);
        `allow_spinning` (older name `spin`): let idle threads busy-wait (default no). `self.threads`
        records the choice; `self.provider` the provider in use."""
        if provider is not None:  # checked, and against `providers` when both are given
            resolve_provider(provider, providers)
            providers = providers or list(PROVIDERS[provider])
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify_sha256=verify_sha256)
        super().__init__(PolicySpec.from_bundle(self.bundle))
        if not threads and os.environ.get("DPKIT_ORT_THREADS"):  # the older, ORT-only spelling
            threads = parse_threads(os.environ["DPKIT_ORT_THREADS"], "$DPKIT_ORT_THREADS")
        self.threads = choose_threads(threads, params=bundle_params(self.bundle.path),
                                      spin=resolve_spin(spin, allow_spinning))
        b, n, spin = self.bundle, self.threads.threads, self.threads.spin
        self.encoder = make_session(b.graph_files["encoder"], self._providers(providers, "encoder"), n, spin)
        self.denoiser = make_session(b.graph_files["denoiser"], self._providers(providers, "denoiser"), n, spin)
        self.providers = self.denoiser.get_providers()
        self.provider = provider_name(self.providers[0]) or str(self.providers[0])
        if provider is not None and self.provider != provider:
            raise DpkitError(f"provider {provider!r} is not available in ONNX Runtime here (it loaded "
                             f"{self.providers[0]}); install onnxruntime-gpu for cuda/tensorrt")
        self._check_graph_io()
        self._plans: dict[str, StepPlan] = {}

    def _providers(self, providers: list[Any] | None, graph: str) -> list[Any] | None:
        """A bare "TensorrtExecutionProvider" gets the options that reuse the bundle's exported engines."""
        if not providers:
            return providers
        return [("TensorrtExecutionProvider", bundle_trt_options(self.bundle, graph))
                if p == "TensorrtExecutionProvider" else p for p in providers]

    def _check_graph_io(self) -> None:
        # What the provider really loaded (load_bundle checked the files): names, types, fixed sizes.
        # Graphs exported with --fp16 keep float32 inputs and outputs (casts are inside), so the loop is
        # the same for both precisions.
        for graph, session in (("encoder", self.encoder), ("denoiser", self.denoiser)):
            check_graph_io(self.bundle, graph, session.get_inputs(), session.get_outputs())

    def plan(self, sampler: str | None = None, steps: int | None = None) -> StepPlan:
        """The numpy step plan of the sampler `sample(sampler=..., steps=...)` runs."""
        return self.resolve_sampler(sampler, steps).handle

    def _find(self, sampler: str | None, steps: int | None) -> SamplerChoice:
        spec = self.bundle.schedule.find(sampler, steps)
        if spec.name not in self._plans:
            self._plans[spec.name] = StepPlan.build(self.bundle.schedule, spec)
        plan = self._plans[spec.name]
        return SamplerChoice(spec.name, spec.sampler, spec.num_inference_steps, plan.uses_step_noise, plan)

    def encode(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        arrays, _ = self.check_obs(obs)
        return self.encoder.run(["cond"], arrays)[0]

    def denoise(self, sample: np.ndarray, timestep: np.ndarray, cond: np.ndarray) -> np.ndarray:
        return self.denoiser.run(["noise_pred"], {"sample": sample, "timestep": timestep, "cond": cond})[0]

    def encoder_call(self, obs: dict[str, np.ndarray]):
        return lambda: self.encode(obs)

    def denoiser_call(self, obs: dict[str, np.ndarray], timestep: int = 50, seed: int = 0):
        # Network time only: inputs and output bound once (IOBinding), so the per-call numpy conversion the
        # Python loop pays counts as loop overhead, and the C++ loop is compared with the same number.
        cond = self.encode(obs)
        batch = len(cond)
        x = np.random.default_rng(seed).standard_normal((batch, self.horizon, self.action_dim), dtype=np.float32)
        t = np.full((batch,), timestep, dtype=np.int64)
        binding = self.denoiser.io_binding()
        for name, value in (("sample", x), ("timestep", t), ("cond", cond)):
            binding.bind_cpu_input(name, value)
        binding.bind_output("noise_pred")
        return lambda: self.denoiser.run_with_iobinding(binding)

    def _run(self, arrays, batch, choice, initial_noise, step_noise, inpaint) -> np.ndarray:
        cond = self.encoder.run(["cond"], arrays)[0]
        run = self.denoiser.run
        return run_reverse(lambda s, t: run(["noise_pred"], {"sample": s, "timestep": t, "cond": cond})[0],
                           choice.handle, initial_noise, step_noise, inpaint)
