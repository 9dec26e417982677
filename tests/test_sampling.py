"""The numpy reverse step (dpkit.runtime.sampling.StepPlan) against diffusers' own step, one step at a time.

The step is float32 arithmetic in diffusers' order (docs/bundle-format.md, "The reverse step"). It equals
the C++ runtime's bit for bit (both read cpp/tests/data/schedule_fixture.json, made by
cpp/tests/make_schedule_fixture.py) and diffusers' to a few float32 ulps: PyTorch's CPU sqrt (MKL's vector
sqrt) is not always correctly rounded, so a scalar of the step can be one ulp away from IEEE sqrt's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpkit.errors import DpkitError
from dpkit.export.schedule import build_scheduler
from dpkit.runtime.bundle import Schedule
from dpkit.runtime.sampling import StepPlan
from dpkit.train.config import load_config
from dpkit.train.normalizer import Normalizer
from dpkit.train.policy import DiffusionPolicy

FIXTURE = Path(__file__).resolve().parents[1] / "cpp" / "tests" / "data" / "schedule_fixture.json"
# Per-step bound relative to max(1, |diffusers' output|): measured <= 1.05e-6 (clip off, where x0 reaches
# ~1e3 at t = 99), 1.43e-6 for prediction_type "sample" (DDIM-10, linear, clip off: eps derived from x0);
# the float64 coefficients this step replaced were up to 7.5e-5 off in DDPM.
STEP_TOL = 2e-6


def _scheduler_dict(beta_schedule: str, clip_sample: bool, prediction_type: str = "epsilon") -> dict:
    cfg = load_config("tiny", [f"policy.beta_schedule={beta_schedule}",
                               f"policy.clip_sample={str(clip_sample).lower()}",
                               f"policy.prediction_type={prediction_type}"])
    rng = np.random.default_rng(0)
    policy = DiffusionPolicy(cfg.policy, Normalizer.fit({"action": rng.uniform(0, 512, (50, 2)),
                                                          "obs": rng.uniform(0, 512, (50, 20))}))
    return build_scheduler(policy, ddim_steps=(1, 8, 10), ddpm_steps=(10,))


def _diffusers(kind: str, steps: int, beta_schedule: str, clip_sample: bool, set_alpha_to_one: bool = True,
               prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=100, beta_schedule=beta_schedule, clip_sample=clip_sample,
              prediction_type=prediction_type)
    sched = (DDPMScheduler(variance_type="fixed_small", **kw) if kind == "ddpm"
             else DDIMScheduler(set_alpha_to_one=set_alpha_to_one, steps_offset=0, **kw))
    sched.set_timesteps(steps)
    return sched


def test_step_matches_the_table_the_cpp_runtime_runs():
    fx = json.loads(FIXTURE.read_text())
    checked = exact = 0
    for case in fx["cases"]:  # each names what its "eps" (the denoiser's output) is: epsilon or x0
        schedule = Schedule.from_dict({**fx["scheduler"], "prediction_type": case["prediction_type"]})
        spec = next(s for s in schedule.samplers if s.name == case["sampler"])
        plan = StepPlan.build(schedule, spec)
        assert [s["t"] for s in case["steps"]] == list(plan.timesteps)
        for k, s in enumerate(case["steps"]):
            x, eps, noise = (np.asarray(s[key], np.float32) for key in ("x", "eps", "noise"))
            ours = plan.step(k, x, eps, noise)
            assert np.array_equal(ours, np.asarray(s["ours"], np.float32)), f"{case['sampler']} step {k}"
            want = np.asarray(s["out"], np.float32)
            assert np.all(np.abs(ours - want) <= STEP_TOL * np.maximum(1, np.abs(want))), f"{case['sampler']} step {k}"
            checked += ours.size
            exact += int(np.sum(ours == want))
    assert checked > 1800 and exact > checked // 2
    assert {c["prediction_type"] for c in fx["cases"]} == {"epsilon", "sample"}


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear"])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("name,set_alpha_to_one", [("ddpm-100", True), ("ddpm-10", True), ("ddim-10", True),
                                                   ("ddim-8", False), ("ddim-1", True)])
def test_each_step_matches_diffusers(beta_schedule, clip_sample, name, set_alpha_to_one, prediction_type):
    """`eps` below is the denoiser's output: the noise, or x0 for prediction_type "sample"."""
    d = _scheduler_dict(beta_schedule, clip_sample, prediction_type)
    assert d["prediction_type"] == prediction_type
    kind, steps = name.split("-")[0], int(name.split("-")[1])
    ref = _diffusers(kind, steps, beta_schedule, clip_sample, set_alpha_to_one, prediction_type)
    if not set_alpha_to_one:  # the manifest carries diffusers' final_alpha_cumprod (alphas_cumprod[0] here)
        for s in d["samplers"]:
            if s["name"] == name:
                s["final_alpha_cumprod"] = float(ref.final_alpha_cumprod)
        assert float(ref.final_alpha_cumprod) < 1.0
    schedule = Schedule.from_dict(d)
    plan = StepPlan.build(schedule, schedule.find(kind, steps))
    assert list(plan.timesteps) == [int(t) for t in ref.timesteps]
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for k, t in enumerate(ref.timesteps):
        x = torch.randn(3, 16, 2, generator=gen) * 2.0  # wide enough to hit the clip on both sides
        eps = torch.randn(3, 16, 2, generator=gen) * 2.0
        if kind == "ddpm":  # the noise step() draws from a generator seeded k, drawn here the same way
            want = ref.step(eps, t, x, generator=torch.Generator().manual_seed(k)).prev_sample.numpy()
            noise = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(k)).numpy()
        else:
            want, noise = ref.step(eps, t, x, eta=0.0).prev_sample.numpy(), None
        given = eps.numpy().copy()
        ours = plan.step(k, x.numpy(), given, noise)
        assert ours.dtype == np.float32 and np.array_equal(given, eps.numpy())  # the output is not clipped in place
        worst = max(worst, float(np.max(np.abs(ours - want) / np.maximum(1, np.abs(want)))))
    assert worst <= STEP_TOL, f"{name} {beta_schedule} clip={clip_sample} {prediction_type}: max rel diff {worst:.2e}"


def test_noise_levels_for_inpainting():
    """`levels` are the chain's alpha_cumprod values in float64: the start, then each step's output."""
    schedule = Schedule.from_dict(_scheduler_dict("squaredcos_cap_v2", True))
    for kind, steps in (("ddpm", 100), ("ddim", 10)):
        plan = StepPlan.build(schedule, schedule.find(kind, steps))
        acp = schedule.alphas_cumprod
        assert plan.levels.dtype == np.float64 and len(plan.levels) == plan.num_steps + 1
        assert plan.levels[0] == acp[plan.timesteps[0]] and plan.levels[-1] == 1.0
        assert np.array_equal(plan.levels[1:-1], acp[plan.timesteps[1:]])


def test_a_step_degenerate_in_float32_is_refused():
    d = _scheduler_dict("squaredcos_cap_v2", True)
    d["alphas_cumprod"][0] = 1.0 - 1e-9  # < 1 in float64, 1 in float32: the step would divide by zero
    schedule = Schedule.from_dict(d)
    with pytest.raises(DpkitError, match="degenerate step"):
        StepPlan.build(schedule, schedule.find("ddpm", 100))
