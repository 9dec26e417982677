"""The shares docs/fewstep-distillation.md (and README "Few-step policies") quote beside goal/, a record of how
they were computed: the demonstrations' steps with the block within 15 px of the goal (all, and in the last
fifth of each demonstration), and the share of episodes whose best coverage reaches 0.95 in the committed
evaluations.

    .venv/bin/python benchmarks/results/fewstep/student_inputs/goal/shares.py > benchmarks/results/fewstep/student_inputs/goal/shares.txt
"""
import glob
import json
from pathlib import Path

import numpy as np

from dpkit.benchmarks.fewstep_spread import goal_distance
from dpkit.train.data import load_replay, resolve_dataset_path

replay = load_replay(resolve_dataset_path(None), "lowdim")
d = goal_distance(replay.lowdim_obs[:, None, :])
ends = np.asarray(replay.episode_ends)
starts = np.r_[0, ends[:-1]]
late = np.concatenate([np.arange(e - s) >= 0.8 * (e - s) for s, e in zip(starts, ends)])
print(f"demonstration steps within 15 px of the goal: {np.mean(d < 15):.3f} of {len(d)}; "
      f"in the last fifth of each demonstration: {np.mean(d[late] < 15):.3f}")
evals = Path(__file__).resolve().parent.parent / "evals"
for pattern in ("R_s42_fewstep-1", "R_s43_fewstep-1", "teacher_s42_ddpm-100", "teacher_s43_ddpm-100"):
    files = sorted(glob.glob(str(evals / f"{pattern}*.json")))
    best = np.array([[e["max_reward"] for e in json.loads(Path(f).read_text())["episodes"]] for f in files])
    print(f"{pattern}: {len(files)} evaluations, episodes reaching 0.95: {np.mean(best >= 0.95):.3f}")
