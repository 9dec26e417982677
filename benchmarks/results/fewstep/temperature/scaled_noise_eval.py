"""dpkit-eval with the sampler's initial noise multiplied by TEMP (a record of how temperature/ was measured,
not a dpkit feature): the noise is drawn by the Python side from the evaluation's own seeds, as every backend
draws it, then scaled; T = 1.0 is run the same way, so the comparison is paired on identical noise.

    TEMP=0.85 .venv/bin/python benchmarks/results/fewstep/temperature/scaled_noise_eval.py --bundle B \
        --backend cpp --sampler fewstep-1 --episodes 200 --seed-start 0 --threads 1 --sample-seed 0 --json OUT
"""
import os
import sys
from importlib.metadata import entry_points

import dpkit.runtime.backend as backend
from dpkit.sampling import draw_noise

SCALE = float(os.environ["TEMP"])


def scaled(shape, num_steps, needs_step_noise, initial_noise, step_noise, seed, fill=True):
    initial, step = draw_noise(shape, num_steps, needs_step_noise, initial_noise, step_noise, seed, fill=True)
    return (initial * SCALE).astype(initial.dtype), step


backend.draw_noise = scaled
main = next(e for e in entry_points(group="console_scripts") if e.name == "dpkit-eval").load()
sys.exit(main())
