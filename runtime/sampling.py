"""The numpy reference of the reverse process, as the runtime names it: dpkit.sampling is its one home.

    from dpkit.runtime.sampling import StepPlan, run_reverse
    plan = StepPlan.build(bundle.schedule, bundle.schedule.find("ddim", 10))
    traj = run_reverse(lambda x, t: denoiser(x, t, cond), plan, initial_noise, step_noise)

The step, inpainting and the loop live in the core package (dpkit/sampling.py), where the PyTorch policy
runs the same loop with torch tensors; this module keeps the runtime's import path.
"""

from dpkit.sampling import KINDS, MIN_VARIANCE, Inpaint, StepPlan, draw_noise, run_reverse

__all__ = ["KINDS", "MIN_VARIANCE", "Inpaint", "StepPlan", "draw_noise", "run_reverse"]
