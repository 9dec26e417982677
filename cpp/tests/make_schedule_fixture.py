"""Regenerate cpp/tests/data/schedule_fixture.json: reverse steps computed by diffusers, for test_schedule.

    .venv/bin/python cpp/tests/make_schedule_fixture.py

For each sampler and prediction type the fixture holds, per step k, a random x and denoiser output "eps"
(the noise, or x0 for prediction_type "sample"), the standard-normal noise diffusers drew, diffusers'
`prev_sample` ("out", float32) and the numpy reference's step (dpkit.runtime.sampling, "ours"). The C++ test
(test_schedule.cpp) builds its scalars from the same manifest `scheduler` object, with the case's
"prediction_type", and must equal "ours" bit for bit and "out" to a few float32 ulps; tests/test_sampling.py
holds the numpy step to the same table. Committed; rerun only when the step definition changes (the epsilon
cases come first, so adding cases after them leaves theirs as they were).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dpkit.runtime.bundle import Schedule
from dpkit.runtime.sampling import StepPlan

sys.path.insert(0, str(Path(__file__).parent))
from make_test_bundle import T_TRAIN, scheduler_json  # noqa: E402

N = 8  # floats per step: enough to hit the clip on both sides


def main() -> int:
    sched = scheduler_json()
    torch.manual_seed(0)
    cases = []
    for pred, name in [("epsilon", "ddpm-100"), ("epsilon", "ddpm-10"), ("epsilon", "ddim-10"),
                       ("sample", "ddpm-100"), ("sample", "ddpm-10"), ("sample", "ddim-10")]:
        schedule = Schedule.from_dict({**sched, "prediction_type": pred})
        entry = next(s for s in sched["samplers"] if s["name"] == name)
        kw = dict(num_train_timesteps=T_TRAIN, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                  prediction_type=pred)
        sch = (DDPMScheduler(variance_type="fixed_small", **kw) if entry["sampler"] == "ddpm"
               else DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **kw))
        sch.set_timesteps(entry["num_inference_steps"])
        plan = StepPlan.build(schedule, schedule.find(entry["sampler"], entry["num_inference_steps"]))
        steps = []
        for k, t in enumerate(sch.timesteps):
            x = torch.randn(1, N) * 1.5
            eps = torch.randn(1, N) * 1.5
            g = torch.Generator().manual_seed(int(t) + 1000)
            noise = torch.randn((1, N), generator=torch.Generator().manual_seed(int(t) + 1000))
            if entry["sampler"] == "ddpm":
                out = sch.step(eps, t, x, generator=g).prev_sample
            else:
                out = sch.step(eps, t, x, eta=0.0).prev_sample
            ours = plan.step(k, x[0].numpy(), eps[0].numpy(), noise[0].numpy())
            steps.append({"t": int(t), "x": x[0].tolist(), "eps": eps[0].tolist(), "noise": noise[0].tolist(),
                          "out": out[0].tolist(), "ours": [float(v) for v in ours]})
        cases.append({"sampler": name, "prediction_type": pred, "steps": steps})
    out = Path(__file__).parent / "data" / "schedule_fixture.json"
    out.write_text(json.dumps({"scheduler": sched, "cases": cases}) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
