"""Each scale's mean over sample seeds and its paired difference from T = 1.0 (output: compare.txt).

    .venv/bin/python benchmarks/results/fewstep/temperature/compare.py > benchmarks/results/fewstep/temperature/compare.txt
"""
import glob
import json
from pathlib import Path

import numpy as np

EVALS = Path(__file__).resolve().parent / "evals"


def rewards(run, scale):
    files = sorted(glob.glob(str(EVALS / f"{run}_fewstep-1_T{scale}_n*.json")))
    return np.mean([[e["max_reward"] for e in json.loads(Path(f).read_text())["episodes"]] for f in files], 0), len(files)


for run in ("R_s42", "R_s43"):
    base, _ = rewards(run, "1.0")
    for scale in ("0.7", "0.85", "1.0", "1.15"):
        r, k = rewards(run, scale)
        d = r - base
        print(f"{run} fewstep-1 scale {scale} ({k} sample seeds): score {r.mean():.3f}, "
              f"against 1.0 {d.mean():+.3f} (paired SE {d.std(ddof=1) / np.sqrt(len(d)):.3f}), episodes < 0.5: {(r < 0.5).sum()}")
