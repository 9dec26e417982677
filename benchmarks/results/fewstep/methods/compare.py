"""Each pilot student's mean score over sample seeds 0-2 and its paired difference from the recipe (R, in
fewstep/student_inputs/evals/) on the same teacher (output: compare.txt).

    .venv/bin/python benchmarks/results/fewstep/methods/compare.py > benchmarks/results/fewstep/methods/compare.txt
"""
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "student_inputs" / "evals"


def rewards(folder, run, sampler):
    out = []
    for k in range(3):
        path = folder / f"{run}_{sampler}{'' if k == 0 else f'_n{k}'}.json"
        if not path.is_file():
            return None
        out.append([e["max_reward"] for e in json.loads(path.read_text())["episodes"]])
    return np.mean(out, 0)


for name in ("CD", "PD", "DM", "DN", "DO"):
    for teacher in (42, 43):
        for sampler in ("fewstep-1", "fewstep-2"):
            r = rewards(HERE / "evals", f"{name}_s{teacher}", sampler)
            if r is None:
                continue
            base = rewards(RECIPE, f"R_s{teacher}", sampler)
            d = r - base
            print(f"{name}_s{teacher} {sampler}: {r.mean():.3f} (R {base.mean():.3f}; "
                  f"{d.mean():+.3f}, paired SE {d.std(ddof=1) / np.sqrt(len(d)):.3f})")
