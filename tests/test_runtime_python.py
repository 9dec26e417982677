"""The numpy reverse process against diffusers, bundle validation, and the Python backends' contract."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dpkit.errors import DpkitError
from dpkit.export.schedule import DEFAULT_DDIM_STEPS, build_scheduler
from dpkit.runtime.backend import validate_observations as validate_obs
from dpkit.runtime.bundle import Schedule
from dpkit.runtime.sampling import StepPlan, draw_noise, run_reverse
from dpkit.train.config import load_config
from dpkit.train.normalizer import Normalizer
from dpkit.train.policy import DiffusionPolicy

B, H, A = 3, 16, 2
IMAGE_SPEC = [{"name": "image", "shape": [3, 96, 96], "dtype": "float32"},
              {"name": "agent_pos", "shape": [2], "dtype": "float32"}]


def _policy(**overrides) -> DiffusionPolicy:
    cfg = load_config("tiny", [f"policy.{k}={v}" for k, v in overrides.items()])
    rng = np.random.default_rng(0)
    return DiffusionPolicy(cfg.policy, Normalizer.fit({"action": rng.uniform(0, 512, (50, 2)),
                                                        "obs": rng.uniform(0, 512, (50, 20))}))


def _schedule(clip_sample=True) -> Schedule:
    return Schedule.from_dict(build_scheduler(_policy(clip_sample=str(clip_sample).lower())))


def _diffusers(kind, clip_sample=True):
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=clip_sample,
              prediction_type="epsilon")
    if kind == "ddpm":
        return DDPMScheduler(variance_type="fixed_small", **kw)
    return DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **kw)


def _fake_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the denoiser: depends on x and t, large enough to hit the clip."""
    return np.tanh(1.7 * x + 0.01 * t[:, None, None].astype(np.float32)) * 1.3


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 10), ("ddim", 8), ("ddim", 1), ("ddim", 100)])
def test_reverse_loop_matches_diffusers(kind, steps, clip_sample):
    sched = _schedule(clip_sample)
    plan = StepPlan.build(sched, sched.find(kind, steps))
    rng = np.random.default_rng(0)
    x_init = rng.standard_normal((B, H, A), dtype=np.float32) * 2.0
    init, noise = draw_noise((B, H, A), plan.num_steps, plan.uses_step_noise, x_init, None, seed=1)
    ours = run_reverse(_fake_eps, plan, init, noise)

    ref = _diffusers(kind, clip_sample)
    ref.set_timesteps(steps)
    assert [int(t) for t in ref.timesteps] == list(plan.timesteps)
    x = torch.from_numpy(x_init.copy())
    for k, t in enumerate(ref.timesteps):
        eps = torch.from_numpy(_fake_eps(x.numpy(), np.full((B,), int(t))))
        if kind == "ddpm":
            # DDPMScheduler.step draws its noise with randn_tensor: make that draw return our noise.
            import diffusers.schedulers.scheduling_ddpm as mod

            orig = mod.randn_tensor
            mod.randn_tensor = lambda *a, **k_: torch.from_numpy(noise[k].copy())
            try:
                x = ref.step(eps, t, x).prev_sample
            finally:
                mod.randn_tensor = orig
        else:
            x = ref.step(eps, t, x, eta=0.0).prev_sample
    # Without clipping, x0 = x / sqrt(a_t) amplifies float32 rounding ~2000x at t = 99 (a_t = 2.4e-7)
    # and the values grow accordingly, so the bound is relative to the result's magnitude.
    ref_x = x.numpy()
    err = np.abs(ours - ref_x).max() / max(1.0, np.abs(ref_x).max())
    assert err < 2e-6, f"{kind}-{steps} clip={clip_sample}: max rel diff {err}"


def test_schedule_table_lists_defaults_and_matches_diffusers_arrays():
    d = build_scheduler(_policy())
    names = [s["name"] for s in d["samplers"]]
    assert names[0] == "ddpm-100" and all(f"ddim-{k}" in names for k in DEFAULT_DDIM_STEPS)
    assert d["default_sampler"] == "ddim-10"
    ddim8 = next(s for s in d["samplers"] if s["name"] == "ddim-8")
    assert ddim8["timesteps"][0] == 84 and ddim8["prev_timesteps"][-1] == -1  # 100 // 8 = 12 spacing
    ref = _diffusers("ddpm")
    np.testing.assert_allclose(d["alphas_cumprod"], ref.alphas_cumprod.numpy(), rtol=0, atol=0)


def test_find_sampler_errors_name_available():
    sched = _schedule()
    assert sched.find().name == "ddim-10"
    assert sched.find("ddpm").name == "ddpm-100"
    with pytest.raises(DpkitError, match="available: ddpm-100"):
        sched.find("ddim", 7)
    with pytest.raises(DpkitError, match="unknown sampler"):
        sched.find("euler", 10)


def test_injected_noise_is_checked():
    sched = _schedule()
    plan = StepPlan.build(sched, sched.find("ddpm", 100))
    def draw(init, noise, seed=None):
        return draw_noise((B, H, A), plan.num_steps, plan.uses_step_noise, init, noise, seed)

    with pytest.raises(DpkitError, match=r"initial_noise has shape"):
        draw(np.zeros((B, H)), None)
    with pytest.raises(DpkitError, match=r"step_noise has shape"):
        draw(None, np.zeros((10, B, H, A)))
    bad = np.zeros((B, H, A), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(DpkitError, match="NaN"):
        draw(bad, None)
    a, b, c = draw(None, None, seed=5), draw(None, None, seed=5), draw(None, None, seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])
    assert a[1].shape == (100, B, H, A)


def test_validate_obs_errors():
    spec = IMAGE_SPEC
    good = {"image": np.zeros((2, 2, 3, 96, 96), np.float32), "agent_pos": np.zeros((2, 2, 2), np.float32)}
    arrs, batch = validate_obs(good, spec, n_obs_steps=2)
    assert batch == 2 and arrs["image"].dtype == np.float32
    with pytest.raises(DpkitError, match="missing"):
        validate_obs({"image": good["image"]}, spec, 2)
    with pytest.raises(DpkitError, match="expected \\(B, 2, 3, 96, 96\\)"):
        validate_obs({**good, "image": np.zeros((2, 3, 96, 96))}, spec, 2)
    with pytest.raises(DpkitError, match="batch size"):
        validate_obs({**good, "agent_pos": np.zeros((3, 2, 2))}, spec, 2)
    with pytest.raises(DpkitError, match="NaN or Inf"):
        validate_obs({**good, "agent_pos": np.full((2, 2, 2), np.inf)}, spec, 2)
    with pytest.raises(DpkitError, match="dtype"):
        validate_obs({**good, "agent_pos": np.full((2, 2, 2), "a")}, spec, 2)


def test_unknown_and_unavailable_backends(tmp_path, monkeypatch):
    import sys

    import dpkit.runtime
    from dpkit.runtime import load_policy

    with pytest.raises(DpkitError, match="unknown backend"):
        load_policy(tmp_path, backend="onnx")
    # An install whose compiled module is missing (built without the C++ runtime): hide _core for this call,
    # and the cpp backend module that imported it, so load_policy imports both afresh and fails.
    monkeypatch.setitem(sys.modules, "dpkit.runtime._core", None)
    monkeypatch.delitem(sys.modules, "dpkit.runtime.cpp_policy", raising=False)
    monkeypatch.delattr(dpkit.runtime, "_core", raising=False)
    with pytest.raises(DpkitError, match="'cpp' backend is not available in this install") as e:
        load_policy(tmp_path, backend="cpp")
    assert "_core" in str(e.value)
