"""Diffusion Policy: observation encoder + conditional U-Net denoiser + diffusers noise schedulers.

    policy = DiffusionPolicy(cfg.policy, Normalizer.fit({"action": a, "obs": o}))
    loss = policy({"obs": {"obs": obs}, "action": actions})             # training: MSE to eps (or x0)
    policy.eval()
    actions = policy.predict_action({"obs": obs}, sampler="ddim")       # (B, Ta, A) env units

The two halves are exported separately: `policy.encoder` (raw observations -> condition, normalization
and center crop inside) and `policy.denoiser` (noisy trajectory, step, condition -> noise, or x0 with
`prediction_type: sample`). `sample()` is the PyTorch reference the ONNX and C++ runtimes are checked
against: it runs dpkit.sampling's loop (the one Python home of the reverse step, checked against
diffusers' own `step()` in tests/test_sampling.py) with these networks, on the chain `sampler_spec` reads
from diffusers. Noise
can be injected (`initial_noise`, `step_noise`) so that every runtime can be compared on the same draws.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from dpkit.errors import DpkitError
from dpkit.sampling import Inpaint, SamplerSpec, StepPlan, run_reverse
from dpkit.sampling_args import resolve_sampler
from dpkit.train.config import IMAGE_SIZE, LOWDIM_OBS_DIM, PolicyConfig
from dpkit.train.normalizer import Normalizer
from dpkit.train.unet import ConditionalUnet1D
from dpkit.train.vision import ImageEncoder

AGENT_POS_DIM = 2

# Per-step observation layout of each mode, in encoder input order: (name, shape, description).
# A config's `obs_keys`/`obs_dims` replace it (policies converted from other projects): see obs_specs.
OBS_SPECS: dict[str, list[tuple[str, tuple[int, ...], str]]] = {
    "image": [
        ("image", (3, IMAGE_SIZE, IMAGE_SIZE), "RGB image, channels first, float in [0, 1]"),
        ("agent_pos", (AGENT_POS_DIM,), "agent x, y in pixels"),
    ],
    "lowdim": [
        ("obs", (LOWDIM_OBS_DIM,), "9 block keypoints x0, y0, ..., x8, y8 then agent x, y, in pixels"),
    ],
}
# What a converted policy's observation names mean (dpkit-eval builds them from these names).
OBS_DESCRIPTIONS = {
    "image": OBS_SPECS["image"][0][2],
    "agent_pos": OBS_SPECS["image"][1][2],
    "obs": OBS_SPECS["lowdim"][0][2],
    "state": "lerobot observation.state (PushT: agent x, y in pixels)",
    "environment_state": "lerobot observation.environment_state (PushT: the block's 8 corners x0, y0, ..., x7, y7 "
                         "in pixels, gym-pusht's environment_state)",
}


def obs_specs(cfg: PolicyConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, per-step shape, description) of each observation, in encoder input = conditioning order."""
    if not cfg.obs_keys:
        return OBS_SPECS[cfg.obs_mode]
    dims = iter(cfg.obs_dims)
    specs = []
    for name in cfg.obs_keys:
        shape = (3, IMAGE_SIZE, IMAGE_SIZE) if name == "image" else (next(dims),)
        specs.append((name, shape, OBS_DESCRIPTIONS.get(name, f"{shape[0]} values")))
    return specs


_NAMED_FORWARD: dict[tuple[type, tuple[str, ...]], type] = {}


def named_forward(cls: type, names: list[str] | tuple[str, ...]) -> type:
    """A subclass of `cls` whose forward takes exactly `names` (positional or keyword) and passes them on in
    that order to `cls.forward(*inputs)`. torch.export binds inputs (and dynamic shapes) through the
    forward's signature, so a module whose inputs are a policy's observation names needs this one."""
    key = (cls, tuple(names))
    if key not in _NAMED_FORWARD:
        sig = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        base = cls.forward

        def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
            bound = sig.bind(self, *args, **kwargs)
            return base(self, *[bound.arguments[n] for n in key[1]])

        forward.__signature__ = sig
        _NAMED_FORWARD[key] = type(cls.__name__, (cls,), {"forward": forward, "__qualname__": cls.__qualname__,
                                                           "__module__": cls.__module__})
    return _NAMED_FORWARD[key]


class ObsEncoder(nn.Module):
    """Raw observation history -> condition vector (exported as encoder.onnx).

    forward(*observations in obs_specs order) -> (B, To * sum of per-step features): per step, each
    observation's feature in that order (an image: its encoder feature; a vector: normalized), e.g.
    image:  forward(image (B, To, 3, 96, 96) in [0, 1], agent_pos (B, To, 2) px) -> (B, To * (F + 2))
    lowdim: forward(obs (B, To, 20) px) -> (B, To * 20)
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "ObsEncoder":
        # forward's parameters are the observation names (image, agent_pos / obs / a converted layout's)
        if cls is ObsEncoder and args:
            cls = named_forward(ObsEncoder, [name for name, _, _ in obs_specs(args[0])])
        return super().__new__(cls)

    def __init__(self, cfg: PolicyConfig, normalizer: Normalizer):
        super().__init__()
        self.obs_mode = cfg.obs_mode
        self.n_obs_steps = cfg.n_obs_steps
        specs = obs_specs(cfg)
        self.obs_keys = [name for name, _, _ in specs]
        vectors = [(name, shape[0]) for name, shape, _ in specs if name != "image"]
        self.normalizer = normalizer.subset([name for name, _ in vectors])
        step_dim = sum(d for _, d in vectors)
        if cfg.obs_mode == "image":
            self.image_encoder = ImageEncoder(
                IMAGE_SIZE, cfg.crop_size, cfg.resnet_width, cfg.spatial_softmax_keypoints, cfg.image_feature_dim,
                norm=cfg.encoder_norm,
            )
            # (x - mean) / std as x * scale + offset (float64 -> float32: the default is exactly 2x - 1).
            mean, std = np.asarray(cfg.image_mean, np.float64), np.asarray(cfg.image_std, np.float64)
            for name, value in (("image_scale", 1.0 / std), ("image_offset", -mean / std)):
                self.register_buffer(name, torch.tensor(value, dtype=torch.float32).reshape(3, 1, 1), persistent=False)
            step_dim += cfg.image_feature_dim
        self.out_dim = cfg.n_obs_steps * step_dim

    def forward(self, *observations: Tensor) -> Tensor:
        """The observations in `obs_keys` order, each (B, To, ...)."""
        feats = []
        for name, x in zip(self.obs_keys, observations, strict=True):
            if name == "image":
                # One shared trunk for every step: fold time into the batch, then unfold.
                feat = self.image_encoder(x.flatten(0, 1) * self.image_scale + self.image_offset)
                feats.append(feat.unflatten(0, (-1, self.n_obs_steps)))
            else:
                feats.append(self.normalizer.normalize(name, x))
        return (feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)).flatten(1)


class Denoiser(nn.Module):
    """(sample (B, H, A) normalized, timestep (B,) int64, cond (B, C)) -> predicted noise (exported as denoiser.onnx)."""

    def __init__(self, cfg: PolicyConfig, cond_dim: int):
        super().__init__()
        self.unet = ConditionalUnet1D(
            input_dim=cfg.action_dim,
            global_cond_dim=cond_dim,
            diffusion_step_embed_dim=cfg.diffusion_step_embed_dim,
            down_dims=tuple(cfg.down_dims),
            kernel_size=cfg.kernel_size,
            n_groups=cfg.n_groups,
            skip_connection=cfg.skip_connection,
            final_norm_groups=cfg.final_norm_groups,
        )

        # a few-step student's output per timestep: skip * sample + scale * unet (set_output_mix; None: the U-Net's)
        self.register_buffer("out_skip", None, persistent=False)
        self.register_buffer("out_scale", None, persistent=False)

    def set_output_mix(self, skip: Tensor, scale: Tensor) -> None:
        """Make the output skip[t] * sample + scale[t] * unet(sample, t, cond), per timestep t (tables of
        num_train_timesteps). Buffers, not weights: derived from the config and the schedule, never saved, and
        part of the exported graph (a Gather on each table), so every runtime runs them unchanged."""
        self.out_skip, self.out_scale = skip, scale

    def forward(self, sample: Tensor, timestep: Tensor, cond: Tensor) -> Tensor:
        out = self.unet(sample, timestep, cond)
        if self.out_skip is None:
            return out
        out = out.to(sample.dtype)
        skip = self.out_skip.to(sample.dtype)[timestep][:, None, None]
        scale = self.out_scale.to(sample.dtype)[timestep][:, None, None]
        return skip * sample + scale * out


class DiffusionPolicy(nn.Module):
    """Encoder + denoiser + normalizer; `forward` is the training loss, `sample`/`predict_action` infer."""

    def __init__(self, cfg: PolicyConfig, normalizer: Normalizer):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.obs_specs = obs_specs(cfg)
        self.obs_keys = [name for name, _, _ in self.obs_specs]
        for key, dim in [("action", cfg.action_dim)] + [(n, s[-1]) for n, s, _ in self.obs_specs if len(s) == 1]:
            if key not in normalizer.keys:
                raise DpkitError(f"normalizer lacks statistics for {key!r} (has: {', '.join(normalizer.keys)})")
            got = normalizer.dim(key)
            if got != dim:
                raise DpkitError(f"normalizer {key!r} has {got} dimensions, policy expects {dim}")
        self.normalizer = normalizer
        self.encoder = ObsEncoder(cfg, normalizer)
        self.cond_dim = self.encoder.out_dim
        self.denoiser = Denoiser(cfg, self.cond_dim)
        self.noise_scheduler = self.make_scheduler("ddpm", cfg.num_train_timesteps)
        self._plans: dict[tuple[str, int], StepPlan] = {}  # step_plan's, per (kind, K): the config is fixed
        if cfg.fewstep_later_epsilon:
            self.denoiser.set_output_mix(*later_epsilon_mix(cfg, self.noise_scheduler.alphas_cumprod))

    # ---- observations -------------------------------------------------------------------------------

    def observation_spec(self) -> list[dict[str, Any]]:
        """The bundle's `observations` entries, in encoder input order."""
        return [{"name": n, "shape": list(s), "dtype": "float32", "description": d} for n, s, d in self.obs_specs]

    def example_obs(self, batch_size: int = 1) -> dict[str, Tensor]:
        """Plausible raw observations (mid-grey image, positions mid-table) for tracing and smoke tests."""
        device = next(self.parameters()).device
        obs = {}
        for name, shape, _ in self.obs_specs:
            fill = 0.5 if name == "image" else 256.0
            obs[name] = torch.full((batch_size, self.cfg.n_obs_steps, *shape), fill, device=device)
        return obs

    def _check_obs(self, obs: Mapping[str, Any], check_finite: bool) -> list[Tensor]:
        """Encoder inputs in order, in the model's dtype (float32; float64 after `.double()`, for a reference
        run) on its device; DpkitError on anything malformed."""
        if not isinstance(obs, Mapping):
            raise DpkitError(f"observations must be a dict of tensors, got {type(obs).__name__}")
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise DpkitError(f"observation {missing[0]!r} missing (expected keys: {', '.join(self.obs_keys)})")
        param = next(self.parameters())
        device, dtype = param.device, param.dtype
        out, batch = [], None
        for name, shape, _ in self.obs_specs:
            x = obs[name]
            if not isinstance(x, Tensor):
                x = torch.as_tensor(np.asarray(x))
            if not (x.is_floating_point()):
                raise DpkitError(f"observation {name!r} must be floating point, got {x.dtype}")
            b = x.shape[0] if x.dim() > 0 else None
            expected = (b if batch is None else batch, self.cfg.n_obs_steps, *shape)
            if x.dim() != len(expected) or tuple(x.shape) != expected:
                want = ", ".join(["B" if batch is None else str(batch), *map(str, expected[1:])])
                raise DpkitError(f"observation {name!r}: expected shape ({want}), got {tuple(x.shape)}")
            batch = b
            if check_finite and not bool(torch.isfinite(x).all()):
                raise DpkitError(f"observation {name!r} contains NaN or Inf")
            out.append(x.to(device=device, dtype=dtype))
        return out

    # ---- training -----------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """MSE on {"obs": {name: (B, To, ...)}, "action": (B, H, A) env units} of the denoiser's output to its
        target: the noise (prediction_type "epsilon") or the normalized trajectory x0 ("sample").

        A distillation batch (dpkit.train.distill.Teacher.targets) instead carries the denoiser's inputs and
        target: {"obs", "noisy" (B, H, A), "timestep" (B,), "target" (B, H, A)}, and the loss is the MSE of
        the output to that target (the teacher's result from the same input), weighted per trajectory step
        when it carries "weight" (H,). With "pseudo_huber" c > 0 each window's (weighted) mean square e
        counts as sqrt(e + c^2) - c instead: quadratic below an RMS error of about c, linear above, so the
        windows the student misses most do not dominate the fit."""
        if "obs" in batch and "target" in batch:
            cond = self.encoder(*self._check_obs(batch["obs"], check_finite=False))
            out = self.denoiser(batch["noisy"], batch["timestep"], cond)
            c = float(batch.get("pseudo_huber", 0.0))
            w = batch["weight"].to(out.dtype) if "weight" in batch else None
            if w is None and c == 0.0:
                loss = F.mse_loss(out, batch["target"])
            else:
                per_window = window_mse(out - batch["target"], w)
                loss = per_window.mean() if c == 0.0 else ((per_window + c * c).sqrt() - c).mean()
            if "energy" in batch:
                loss = loss + self._energy_term(cond, batch["energy"], w, c)
            return loss
        if "obs" not in batch or "action" not in batch:
            raise DpkitError("training batch must have 'obs' and 'action'")
        inputs = self._check_obs(batch["obs"], check_finite=False)
        action = batch["action"]
        expected = (inputs[0].shape[0], self.cfg.horizon, self.cfg.action_dim)
        if tuple(action.shape) != expected:
            raise DpkitError(f"action: expected shape {expected}, got {tuple(action.shape)}")
        cond = self.encoder(*inputs)
        x0 = self.normalizer.normalize("action", action.to(cond.dtype))
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.cfg.num_train_timesteps, (x0.shape[0],), device=x0.device, dtype=torch.int64)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        target = x0 if self.cfg.prediction_type == "sample" else noise
        return F.mse_loss(self.denoiser(noisy, t, cond), target)

    def _energy_term(self, cond: Tensor, energy: Mapping[str, Any], w: Tensor | None, c: float) -> Tensor:
        """A distillation batch's energy term (distill.energy_weight; dpkit.train.distill.Teacher.energy_inputs):
        weight x the mean over the student's fewstep-1 .. fewstep-L outputs of their energy score against the
        first m windows' demonstrated actions. Sample s starts from noise[s, 0]; each later call takes the
        previous output re-noised by the few-step rule (the one StepPlan every runtime runs) with noise[s, k],
        and no gradient flows back through it, so each call is scored on its own output."""
        noise, target = energy["noise"], energy["target"]
        samples, calls, m = noise.shape[:3]
        c_rows = cond[:m].repeat(samples, *([1] * (cond.dim() - 1)))
        x = noise[:, 0].reshape(samples * m, *noise.shape[3:])
        total = cond.new_zeros(())
        for k in range(calls):
            plan = self.step_plan("fewstep", k + 1)
            t = torch.full((samples * m,), int(plan.timesteps[k]), dtype=torch.int64, device=x.device)
            out = self.denoiser(x, t, c_rows)
            # the (k+1)-call sampler's output: its last step returns the (clipped) x0
            total = total + energy_score(plan.step(k, x, out, None).reshape(samples, m, *x.shape[1:]), target, w, c)
            if k + 1 < calls:
                nxt = self.step_plan("fewstep", k + 2)
                x = nxt.step(k, x.detach(), out.detach(), noise[:, k + 1].reshape_as(x))
        return float(energy["weight"]) * total / calls

    # ---- inference ----------------------------------------------------------------------------------

    def resolve_sampler(self, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """(kind, K) that `sample(sampler=..., steps=...)` runs: the rule every backend shares. A few-step
        student samples only with "fewstep" (K up to its timesteps); a diffusion policy with DDPM and DDIM."""
        T = self.cfg.num_train_timesteps
        fewstep = self.cfg.fewstep_timesteps
        largest = {"fewstep": len(fewstep)} if fewstep else {"ddpm": T, "ddim": T}
        kind, k = resolve_sampler(sampler, steps, default=self.cfg.default_sampling, largest=largest)
        if kind not in largest:
            what = "a few-step student: it samples with fewstep" if fewstep else "a diffusion policy: ddpm or ddim"
            raise DpkitError(f"sampler {kind!r} is not available: this is {what}")
        return kind, k

    def make_scheduler(self, sampler: str, steps: int) -> DDPMScheduler | DDIMScheduler:
        """A diffusers scheduler with the training betas, `set_timesteps(steps)` already called."""
        if sampler not in ("ddpm", "ddim"):
            raise DpkitError(f"unknown diffusers sampler {sampler!r} (choose from: ddpm, ddim)")
        T = self.cfg.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
            raise DpkitError(f"{sampler} steps must be an integer in [1, {T}], got {steps!r}")
        common = dict(
            num_train_timesteps=T,
            beta_schedule=self.cfg.beta_schedule,
            clip_sample=self.cfg.clip_sample,
            clip_sample_range=self.cfg.clip_sample_range,
            prediction_type=self.cfg.prediction_type,
        )
        if sampler == "ddpm":
            sched = DDPMScheduler(**common, variance_type="fixed_small")
        else:
            sched = DDIMScheduler(**common, set_alpha_to_one=True, steps_offset=0)
        sched.set_timesteps(int(steps))
        return sched

    def sampler_spec(self, sampler: str, steps: int) -> SamplerSpec:
        """The chain (kind, K) walks, as the bundle lists it: the one home of the sampler table.

            policy.sampler_spec("ddim", 10).timesteps   # (90, 80, ..., 0), prev_timesteps (80, ..., 0, -1)

        DDPM and DDIM: diffusers' own `set_timesteps(K)` ("leading" spacing) and what its `step()` steps to
        (DDPM the next listed timestep, DDIM t - num_train_timesteps // K; -1 past the end, where the chain
        reaches final_alpha_cumprod). Few-step: the first K of `fewstep_timesteps`, each re-noised to the next.
        export/schedule.py writes these entries into policy.json; `sample` runs them in dpkit.sampling."""
        if sampler == "fewstep":
            ts = tuple(self.cfg.fewstep_timesteps or ())
            if not 1 <= steps <= len(ts):
                raise DpkitError(f"fewstep steps must be in [1, {len(ts)}] (fewstep_timesteps), got {steps!r}")
            ts = ts[:steps]
            return SamplerSpec(f"fewstep-{steps}", "fewstep", steps, ts, ts[1:] + (-1,), 1.0)
        sched = self.make_scheduler(sampler, steps)
        ts = tuple(int(t) for t in sched.timesteps)
        if sampler == "ddim":
            prev = [t - sched.config.num_train_timesteps // sched.num_inference_steps for t in ts]
            final = float(sched.final_alpha_cumprod)
        else:
            prev = [int(sched.previous_timestep(t)) for t in ts]
            final = float(sched.one)
        return SamplerSpec(f"{sampler}-{steps}", sampler, steps, ts, tuple(max(p, -1) for p in prev), final)

    def step_plan(self, sampler: str, steps: int) -> StepPlan:
        """The float32 step scalars of (kind, K) (dpkit.sampling.StepPlan) from the training schedule's arrays:
        the same plan a bundle's runtimes build from policy.json. Built once per (kind, K), not per chunk."""
        key = (sampler, steps)
        if key not in self._plans:
            self._plans[key] = StepPlan.build(self.schedule_arrays, self.sampler_spec(sampler, steps))
        return self._plans[key]

    @property
    def schedule_arrays(self) -> SimpleNamespace:
        """What dpkit.sampling reads of the schedule: diffusers' float32 alphas_cumprod and the clip/target rule."""
        return SimpleNamespace(alphas_cumprod=self.noise_scheduler.alphas_cumprod.double().numpy(),
                               clip_sample=self.cfg.clip_sample, clip_sample_range=self.cfg.clip_sample_range,
                               prediction_type=self.cfg.prediction_type)

    @torch.no_grad()
    def sample(
        self,
        obs: Mapping[str, Any],
        sampler: str | None = None,
        steps: int | None = None,
        initial_noise: Tensor | None = None,
        step_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        inpaint: Inpaint | tuple[int, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Run the reverse process; returns the normalized trajectory (B, H, A).

        Uses the module's current mode: call `eval()` first for inference behaviour (center crop).
        `initial_noise` (B, H, A) replaces the first draw; `step_noise` (K, B, H, A) supplies the noise of
        step k where the sampler adds some (DDPM at t > 0, few-step before its last step; DDIM none).
        Undrawn noise comes from `generator`, one (B, H, A) draw per noisy step, in order. `sampler` and
        `steps` default as in every backend (dpkit.sampling_args): the default sampler is
        `cfg.default_sampling`; the other kind runs all `num_train_timesteps`. `inpaint`: a
        dpkit.sampling.Inpaint (or (start, values (B, P, A), weights (P,))) keeping rows start..start+P-1
        consistent with a committed prefix. The loop is dpkit.sampling.run_reverse, the one every Python
        runtime runs, with this module's networks.
        """
        sampler, steps = self.resolve_sampler(sampler, steps)
        plan = self.step_plan(sampler, steps)
        inputs = self._check_obs(obs, check_finite=True)
        device, dtype = inputs[0].device, inputs[0].dtype
        shape = (inputs[0].shape[0], self.cfg.horizon, self.cfg.action_dim)
        initial_noise = _check_noise("initial_noise", initial_noise, shape, device, dtype)
        step_noise = _check_noise("step_noise", step_noise, (plan.num_steps, *shape), device, dtype)
        if isinstance(inpaint, tuple):
            start, values, weights = inpaint
            inpaint = Inpaint.check(_to_numpy(values), start, _to_numpy(weights), shape)

        cond = self.encoder(*inputs)
        x = initial_noise if initial_noise is not None else randn_tensor(shape, generator=generator, device=device,
                                                                         dtype=dtype)
        if step_noise is None and plan.uses_step_noise:
            step_noise = _Draws(shape, generator, device, dtype)

        def denoise(x_t: Tensor, t: np.ndarray) -> Tensor:
            return self.denoiser(x_t, torch.from_numpy(t).to(device), cond)  # eps or x0

        return run_reverse(denoise, plan, x, step_noise, inpaint)

    @torch.no_grad()
    def predict_action(self, obs: Mapping[str, Any], **sample_kwargs) -> Tensor:
        """(B, Ta, A) actions in env units: the executed slice of the unnormalized trajectory."""
        traj = self.normalizer.unnormalize("action", self.sample(obs, **sample_kwargs))
        start = self.cfg.first_action_index
        return traj[:, start : start + self.cfg.n_action_steps]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def later_epsilon_mix(cfg: PolicyConfig, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """policy.fewstep_later_epsilon's output tables (Denoiser.set_output_mix): at the student's later timesteps
    the U-Net's output is the noise, and the denoiser returns x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t), the
    teacher's own one-call estimate when the weights are the teacher's; elsewhere (its first timestep, where
    a_t is near 0 and that estimate ill-conditioned) the U-Net's output is x0 itself."""
    acp = alphas_cumprod.double()
    skip = torch.zeros(cfg.num_train_timesteps, dtype=torch.float64)
    scale = torch.ones(cfg.num_train_timesteps, dtype=torch.float64)
    for t in (cfg.fewstep_timesteps or ())[1:]:
        skip[t] = 1.0 / acp[t].sqrt()
        scale[t] = -(1.0 - acp[t]).sqrt() / acp[t].sqrt()
    return skip.float(), scale.float()


def window_mse(diff: Tensor, w: Tensor | None) -> Tensor:
    """Each window's mean square of `diff` (..., H, A) over its trajectory, weighted per step by w (H,)."""
    sq = diff.square()
    if w is None:
        return sq.mean(dim=(-2, -1))
    return (sq * w[:, None]).sum(dim=(-2, -1)) / (w.sum() * diff.shape[-1])


def energy_score(samples: Tensor, y: Tensor, w: Tensor | None, c: float) -> Tensor:
    """The energy score of `samples` (S >= 2, m, H, A), S draws for each of m windows, against one observed
    y (m, H, A) per window, averaged over the windows: mean_s d(X_s, y) - 1/2 mean_{s != s'} d(X_s, X_s').
    d is the distillation loss's per-window distance: sqrt(e + c^2) - c of the weighted mean square e
    (window_mse), about the RMS difference for e >> c^2; c = 0 takes a tiny scale so that the gradient stays
    finite where two samples coincide. With d a conditionally negative definite distance (the multiquadric
    sqrt(r^2 + c^2) is), the score is proper: its expectation over y is lowest when the samples are drawn
    from y's own distribution, so unlike a regression it does not reward samples narrower than the data."""
    c = max(float(c), 1e-4)
    s = samples.shape[0]

    def dist(diff: Tensor) -> Tensor:
        return (window_mse(diff, w) + c * c).sqrt() - c

    to_y = dist(samples - y.unsqueeze(0)).mean()
    i, j = torch.triu_indices(s, s, offset=1)
    spread = dist(samples[i] - samples[j]).mean()  # the mean over unordered pairs is the mean over ordered ones
    return to_y - 0.5 * spread


class _Draws:
    """Step noise drawn on access, one (B, H, A) standard normal per noisy step in order (diffusers' draws)."""

    def __init__(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
                 dtype: torch.dtype):
        self.shape, self.generator, self.device, self.dtype = shape, generator, device, dtype

    def __getitem__(self, k: int) -> Tensor:
        return randn_tensor(self.shape, generator=self.generator, device=self.device, dtype=self.dtype)


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _check_noise(name: str, noise: Tensor | None, shape: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Tensor | None:
    if noise is None:
        return None
    if not isinstance(noise, Tensor):
        noise = torch.as_tensor(np.asarray(noise))
    if tuple(noise.shape) != tuple(shape):
        raise DpkitError(f"{name}: expected shape {tuple(shape)}, got {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise DpkitError(f"{name} contains NaN or Inf")
    return noise.to(device=device, dtype=dtype)
