"""The reverse process — DDPM, DDIM and few-step — written once for Python: the step, inpainting, the loop.

    from dpkit.sampling import StepPlan, run_reverse
    plan = StepPlan.build(schedule, schedule.find("ddim", 10))        # a bundle's arrays, or the model's
    traj = run_reverse(lambda x, t: denoiser(x, t, cond), plan, initial_noise, step_noise)

It reads only the arrays a bundle's `policy.json` carries (never diffusers) and implements exactly the
step written in docs/bundle-format.md. The C++ runtime has the other home (cpp/src/schedule.cpp); the two
agree bit for bit (tests/test_sampling.py, cpp/tests/test_schedule.cpp). Every Python sampler runs this
loop: the "ort" backend with numpy arrays, the PyTorch policy (dpkit.train.policy) with torch tensors —
the arithmetic below uses only operators both array types share, with the float32 scalars passed as
Python floats (exact: each one is a float32 value), so a float32 tensor rounds exactly as numpy does and a
float64 tensor (a reference run) takes the same float32 scalars, as diffusers' schedulers give it.
It lives in the core package because the model (dpkit.train) and the runtime (dpkit.runtime) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from dpkit.errors import DpkitError, InputError

# Floor of the DDPM posterior variance before its square root (as in the spec; keeps sqrt finite at t=0).
MIN_VARIANCE = np.float32(1e-20)
# Sampler kinds and their step rules (docs/bundle-format.md, "The reverse step").
KINDS = ("ddpm", "ddim", "fewstep")


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler entry of a bundle's `scheduler.samplers` (docs/bundle-format.md): which timesteps the
    chain visits, what each step steps to (-1: past the end, at final_alpha_cumprod), and the step rule."""

    name: str
    sampler: str  # a kind of KINDS: "ddpm", "ddim" or "fewstep"
    num_inference_steps: int
    timesteps: tuple[int, ...]
    prev_timesteps: tuple[int, ...]
    final_alpha_cumprod: float
    eta: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplerSpec":
        """From a sampler entry the bundle reader has checked (or dpkit.export.schedule built)."""
        return cls(str(d["name"]), str(d["sampler"]), int(d["num_inference_steps"]),
                   tuple(int(t) for t in d["timesteps"]), tuple(int(t) for t in d["prev_timesteps"]),
                   float(d["final_alpha_cumprod"]), float(d["eta"]))


@dataclass(frozen=True)
class StepPlan:
    """Per-step float32 scalars of one sampler, derived once from the schedule arrays as diffusers derives them.

    Everything is float32, from `a_t = float32(alphas_cumprod[t])` and `a_p` (the prev timestep's, or
    `final_alpha_cumprod`), and step k is, in this order (docs/bundle-format.md, "The reverse step"), for the
    denoiser's output `out`:
        x0  = (x - sqrt_1m_at[k] * out) / sqrt_at[k], eps = out        prediction_type "epsilon"
        x0  = out, eps = (x - sqrt_at[k] * x0) / sqrt_1m_at[k]         prediction_type "sample" (eps: DDIM only)
        clamp x0 to [-r, r] when clip
        x'  = c_x0[k] * x0 + c_x[k] * x          DDPM, and few-step (c_x = 0)
        x'  = c_x0[k] * x0 + c_eps[k] * eps      DDIM (eta = 0; eps before the clamp, not re-derived from it)
        x' += sigma[k] * noise_k                 DDPM at t > 0; few-step before its last step
    DDPM and DDIM are the same operations, rounded at the same points, as diffusers' DDPMScheduler/
    DDIMScheduler.step: a step equals theirs up to PyTorch's CPU sqrt, which is not always correctly rounded
    (a scalar can be one ulp off). The few-step rule (a distilled student, `dpkit-distill`) takes the x0 its
    network predicts and re-noises it to the next listed timestep with fresh noise,
    x' = sqrt(a_p) * x0 + sqrt(1 - a_p) * noise_k, and returns x0 itself after the last one (a_p = 1).
    """

    sampler: Any  # the SamplerSpec (name, sampler, timesteps, ...) this plan was built from
    timesteps: np.ndarray  # (K,) int64
    sqrt_at: np.ndarray  # (K,) float32, as every coefficient below
    sqrt_1m_at: np.ndarray
    c_x0: np.ndarray
    c_x: np.ndarray  # DDPM only (zeros for DDIM and few-step)
    c_eps: np.ndarray  # DDIM only (zeros otherwise)
    sigma: np.ndarray  # 0 where no noise is added (DDIM, DDPM at t = 0, the last few-step step)
    clip: np.float32 | None  # clip_sample_range, or None when clip_sample is off
    predicts_sample: bool  # the denoiser outputs x0 (prediction_type "sample"), else epsilon
    # (K + 1,) float64 alpha_cumprod of the chain's noise levels: the initial sample's, then each step's
    # output (prev timestep, or final_alpha_cumprod after the last step). Only inpainting reads them.
    levels: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def uses_step_noise(self) -> bool:
        return bool(np.any(self.sigma > 0))

    @classmethod
    def build(cls, schedule: Any, sampler: Any) -> "StepPlan":
        """From a schedule (`alphas_cumprod`, `clip_sample`, `clip_sample_range`, `prediction_type`: a bundle's
        dpkit.runtime.bundle.Schedule, or the PyTorch policy's own) and one sampler entry (`name`, `sampler`,
        `timesteps`, `prev_timesteps`, `final_alpha_cumprod`, `eta`: a bundle's SamplerSpec)."""
        acp = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
        t = np.asarray(sampler.timesteps, dtype=np.int64)
        p = np.asarray(sampler.prev_timesteps, dtype=np.int64)
        levels_t = acp[t]
        levels_p = np.where(p >= 0, acp[np.maximum(p, 0)], float(sampler.final_alpha_cumprod))
        a_t, a_p = levels_t.astype(np.float32), levels_p.astype(np.float32)
        if not (np.all(a_t < 1) and np.all(a_p > 0) and np.all(a_p <= 1)):
            k = int(np.argmax(~((a_t < 1) & (a_p > 0) & (a_p <= 1))))
            raise DpkitError(f"sampler {sampler.name}: alphas_cumprod at step {k} gives a degenerate step "
                             f"(a_t = {a_t[k]}, a_p = {a_p[k]} in float32)")
        one = np.float32(1.0)
        beta_t, beta_p = one - a_t, one - a_p
        zeros = np.zeros_like(a_t)
        c_x, c_eps = zeros, zeros
        if sampler.sampler == "ddpm":
            alpha_t = a_t / a_p  # this step's own alpha and beta
            b_t = one - alpha_t
            c_x0 = np.sqrt(a_p) * b_t / beta_t
            c_x = np.sqrt(alpha_t) * beta_p / beta_t
            sigma = np.where(t > 0, np.sqrt(np.maximum(beta_p / beta_t * b_t, MIN_VARIANCE)), zeros)
        elif sampler.sampler == "ddim":
            if sampler.eta != 0.0:
                raise DpkitError(f"sampler {sampler.name}: only eta = 0 is supported, got {sampler.eta}")
            c_x0 = np.sqrt(a_p)
            c_eps = np.sqrt(beta_p)
            sigma = zeros
        elif sampler.sampler == "fewstep":
            c_x0 = np.sqrt(a_p)
            sigma = np.sqrt(beta_p)  # 0 after the last step, where a_p = final_alpha_cumprod = 1
        else:
            raise DpkitError(f"sampler {sampler.name}: unknown kind {sampler.sampler!r} (expected one of {', '.join(KINDS)})")
        return cls(
            sampler=sampler,
            timesteps=t,
            sqrt_at=np.sqrt(a_t),
            sqrt_1m_at=np.sqrt(beta_t),
            c_x0=c_x0,
            c_x=c_x,
            c_eps=c_eps,
            sigma=sigma.astype(np.float32),
            clip=np.float32(schedule.clip_sample_range) if schedule.clip_sample else None,
            predicts_sample=schedule.prediction_type == "sample",
            levels=np.concatenate([levels_t[:1], levels_p]),
        )

    def step(self, k: int, x: Any, out: Any, noise: Any | None) -> Any:
        """One reverse step k: x_t -> x_prev (numpy arrays or torch tensors of one shape, float32 or float64);
        `out` is the denoiser's output. Returns a new array; `x` and `out` are left as they were."""
        ddim = self.sampler.sampler == "ddim"
        s0, s1 = float(self.sqrt_at[k]), float(self.sqrt_1m_at[k])
        if self.predicts_sample:
            eps = (x - s0 * out) / s1 if ddim else None
            x0 = out
        else:
            eps = out
            x0 = (x - s1 * eps) / s0
        if self.clip is not None:
            x0 = x0.clip(-float(self.clip), float(self.clip))  # numpy and torch alike: a new array
        nxt = float(self.c_x0[k]) * x0
        if ddim:
            nxt = nxt + float(self.c_eps[k]) * eps
        else:
            nxt = nxt + float(self.c_x[k]) * x
        if self.sigma[k] != 0.0:
            if noise is None:
                raise DpkitError(f"{self.sampler.name}: step {k} (t={self.timesteps[k]}) needs noise")
            nxt = nxt + float(self.sigma[k]) * noise
        return nxt


def draw_noise(
    shape: tuple[int, int, int],
    num_steps: int,
    needs_step_noise: bool,
    initial_noise: np.ndarray | None,
    step_noise: np.ndarray | None,
    seed: int | None,
    fill: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Check injected noise against (B, H, A) / (K, B, H, A), or draw it from a generator seeded `seed`.

    Draw order (initial, then all K step noises) is fixed so every Python backend given the same seed
    uses the same noise. Injected step noise is ignored by samplers that add none (DDIM, eta = 0).
    `fill=False` only checks what was injected and leaves the rest None (for a backend that draws it).
    """
    rng = np.random.default_rng(seed) if fill else None
    if initial_noise is None:
        initial_noise = rng.standard_normal(shape, dtype=np.float32) if fill else None
    else:
        initial_noise = _check_noise("initial_noise", initial_noise, shape)
    if not needs_step_noise:
        return initial_noise, None
    full = (num_steps, *shape)
    if step_noise is None:
        step_noise = rng.standard_normal(full, dtype=np.float32) if fill else None
    else:
        step_noise = _check_noise("step_noise", step_noise, full)
    return initial_noise, step_noise


@dataclass(frozen=True)
class Inpaint:
    """A committed prefix the new trajectory must continue: `values` (B, P, A) normalized actions that go
    to trajectory rows `start .. start + P - 1`, with per-row weights `weights` (P,) in [0, 1].

    After the initial sample and after every reverse step, row j of that span becomes
        w_j * (sqrt(a) * values_j + sqrt(1 - a) * initial_noise_j) + (1 - w_j) * x_j
    where `a` is the alpha_cumprod of the noise level x is at — the prefix noised to the current level with
    the initial sample's own noise (deterministic, so injected noise gives identical trajectories in every
    runtime). After the last step (a = the final alpha_cumprod, 1 for DDIM and few-step) a weight-1 row
    equals the prefix exactly: hard inpainting. Weights below 1 blend, e.g. decaying over the rest of the
    overlap.
    """

    start: int
    values: np.ndarray
    weights: np.ndarray

    @classmethod
    def check(cls, prefix: np.ndarray, start: int, weights: np.ndarray | None, shape: tuple[int, int, int]) -> "Inpaint":
        batch, horizon, action_dim = shape
        try:
            values = np.asarray(prefix)
        except ValueError as e:
            raise InputError(f"prefix is not a rectangular array ({str(e).splitlines()[0]})") from None
        if values.ndim != 3 or values.shape[0] != batch or values.shape[2] != action_dim or values.shape[1] < 1:
            raise InputError(f"prefix has shape {values.shape}, expected ({batch}, P, {action_dim}) with P >= 1")
        if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.integer):
            raise InputError(f"prefix must be a float array, got {values.dtype}")
        n = values.shape[1]
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= horizon - n:
            raise InputError(f"prefix of {n} rows starting at {start!r} does not fit the horizon {horizon}")
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (n,) or not np.all((w >= 0) & (w <= 1)):
            raise InputError(f"prefix weights must be {n} values in [0, 1], got shape {w.shape}")
        values = values.astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise InputError("prefix contains NaN or Inf")
        return cls(int(start), values, w.astype(np.float32))

    def apply(self, x: Any, x_init: Any, alpha_cumprod: float) -> None:
        """Overwrite the prefix rows of `x` (numpy or torch) in place at the noise level `alpha_cumprod`
        (float64; its two square roots are taken in float64, then rounded to float32)."""
        rows = slice(self.start, self.start + self.values.shape[1])
        w, values = _like(self.weights[None, :, None], x), _like(self.values, x)
        sqrt_a, sqrt_1m_a = float(np.float32(np.sqrt(alpha_cumprod))), float(np.float32(np.sqrt(1.0 - alpha_cumprod)))
        known = sqrt_a * values + sqrt_1m_a * x_init[:, rows]
        x[:, rows] = w * known + (1.0 - w) * x[:, rows]


def run_reverse(
    denoise: Callable[[Any, np.ndarray], Any],
    plan: StepPlan,
    initial_noise: Any,
    step_noise: Sequence[Any] | None,
    inpaint: Inpaint | None = None,
) -> Any:
    """Run all K steps from `initial_noise` (numpy array or torch tensor; the result is of the same kind);
    `denoise(x, t_batch)` -> the denoiser's output (epsilon, or x0 for prediction_type "sample") with
    t_batch (B,) int64 numpy. `step_noise[k]` is read only at steps that add noise (it may be a lazy
    sequence that draws on access). `inpaint` keeps the trajectory consistent with a committed prefix."""
    numpy = isinstance(initial_noise, np.ndarray) or not hasattr(initial_noise, "clone")
    x = np.array(initial_noise, dtype=np.float32, copy=True) if numpy else initial_noise.clone()
    batch = x.shape[0]
    # Timestep arrays are built before the loop so the loop itself only runs the model and the update.
    t_batches = [np.full((batch,), t, dtype=np.int64) for t in plan.timesteps]
    if inpaint is not None:
        inpaint.apply(x, initial_noise, plan.levels[0])
    for k in range(plan.num_steps):
        out = denoise(x, t_batches[k])
        if numpy:
            out = np.asarray(out, dtype=np.float32)
        noise = step_noise[k] if step_noise is not None and plan.sigma[k] != 0.0 else None
        x = plan.step(k, x, out, noise)
        if inpaint is not None:
            inpaint.apply(x, initial_noise, plan.levels[k + 1])
    return x


def _like(a: np.ndarray, x: Any) -> Any:
    """numpy array `a` as the array kind, dtype and device of `x` (a torch tensor's new_tensor copies it)."""
    return a.astype(x.dtype, copy=False) if isinstance(x, np.ndarray) else x.new_tensor(a)


def _check_noise(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(arr)
    except ValueError as e:  # a ragged nested list
        raise InputError(f"{name} is not a rectangular array ({str(e).splitlines()[0]})") from None
    if arr.shape != tuple(shape):
        raise InputError(f"{name} has shape {arr.shape}, expected {tuple(shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{name} must be a float array, got {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or Inf")
    return arr.astype(np.float32, copy=False)
