"""bench_fewstep's statistics on evaluations already on disk (nothing is exported or run): the paired
differences, and the means over sample seeds."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpkit.benchmarks import bench_fewstep
from dpkit.errors import DpkitError

EPISODES = 4


def _report(rewards, steps, sample_seed=0):
    return {"score": float(np.mean(rewards)), "success_rate": float(np.mean([r > 0.95 for r in rewards])),
            "steps": steps, "n_episodes": len(rewards), "sample_seed": sample_seed, "wall_s": 1.0,
            "episodes": [{"seed": 100000 + i, "max_reward": r} for i, r in enumerate(rewards)]}


@pytest.fixture
def runs(tmp_path):
    """Teacher and student run folders, their 'exported' bundles and a work folder of evaluations."""
    teacher, student, cache, work = (tmp_path / n for n in ("teacher", "student", "cache", "evals"))
    for run, cpu in ((teacher, 100.0), (student, 40.0)):
        run.mkdir()
        (run / "train_summary.json").write_text(json.dumps({"cpu_s": cpu, "steps": 10, "wall_s": cpu}))
    for name in ("teacher_bundle", "student_bundle"):
        (cache / name).mkdir(parents=True)
        (cache / name / "policy.json").write_text("{}")
    _student_checkpoint(student, [99, 29])
    work.mkdir()
    return teacher, student, cache, work


def _student_checkpoint(run: Path, timesteps) -> None:
    """The one thing bench_fewstep reads of a student's checkpoint: its policy's fewstep_timesteps."""
    from dpkit.train import checkpoint as ckpt_io

    ckpt = ckpt_io.checkpoints_dir(run) / "step_000010"
    ckpt.mkdir(parents=True)
    (ckpt / ckpt_io.STATE).write_text(json.dumps({"format": ckpt_io.FORMAT, "format_version": ckpt_io.FORMAT_VERSION,
                                                  "step": 10, "normalizer": {},
                                                  "config": {"policy": {"fewstep_timesteps": timesteps}}}))


def _write(work: Path, name: str, sampler: str, seed: int, rewards, steps):
    file = work / (f"{name}_{sampler}.json" if seed == 0 else f"{name}_{sampler}_n{seed}.json")
    file.write_text(json.dumps(_report(rewards, steps, seed)))


def test_pair_means_over_sample_seeds_and_pairs_by_start_state(runs):
    teacher, student, cache, work = runs
    _write(work, "teacher", "ddpm-100", 0, [1.0, 1.0, 0.9, 0.8], 100)  # one DDPM seed (--ddpm-sample-seeds 1)
    for seed, shift in ((0, 0.0), (1, -0.2)):
        _write(work, "teacher", "ddim-10", seed, [1.0, 0.9 + shift, 0.9, 0.8], 10)
        _write(work, "student", "fewstep-1", seed, [0.9, 0.9, 0.4 + shift, 0.8], 1)
        _write(work, "student", "fewstep-2", seed, [1.0, 1.0, 0.9, 0.8 + shift], 2)
    pair = bench_fewstep._pair(teacher, student, EPISODES, work, cache, sample_seeds=2, ddpm_sample_seeds=1)
    rows = pair["samplers"]
    assert rows["ddpm-100"]["scores_by_sample_seed"] == [pytest.approx(0.925)]
    assert rows["ddpm-100"]["sample_seed_sd"] is None
    one = rows["fewstep-1"]
    assert one["scores_by_sample_seed"] == [pytest.approx(0.75), pytest.approx(0.70)]
    assert one["score"] == pytest.approx(0.725) and one["sample_seed_sd"] == pytest.approx(math.sqrt(0.00125))
    # per start state: mean over seeds [0.9, 0.9, 0.3, 0.8] against DDPM [1.0, 1.0, 0.9, 0.8]
    d = np.array([-0.1, -0.1, -0.6, 0.0])
    assert one["diff_vs_ddpm100"] == pytest.approx(d.mean())
    assert one["paired_se"] == pytest.approx(d.std(ddof=1) / 2)
    assert one["of_teacher_ddpm100"] == pytest.approx(0.725 / 0.925)
    assert one["episodes_below_half"] == pytest.approx(1.0)  # 0.4 and 0.2: one episode in each seed
    # against DDIM-10's per-state means [1.0, 0.8, 0.9, 0.8]
    assert one["diff_vs_ddim10"] == pytest.approx(np.mean([-0.1, 0.1, -0.6, 0.0]))
    assert "diff_vs_ddim10" not in rows["ddim-10"]
    assert pair["cost_ratio"] == pytest.approx(0.4)
    # a resumed student: its cost is every run's (cpu_s_total), not the resumed part's (cpu_s)
    (student / "train_summary.json").write_text(json.dumps({"cpu_s": 10.0, "cpu_s_total": 50.0, "steps": 10,
                                                            "wall_s": 10.0}))
    resumed = bench_fewstep._pair(teacher, student, EPISODES, work, cache, sample_seeds=2, ddpm_sample_seeds=1)
    assert resumed["cost_ratio"] == pytest.approx(0.5) and resumed["student_cpu_s"] == 50.0
    md = bench_fewstep._markdown({"machine": "m", "date": "d", "uptime_before": "u", "episodes": EPISODES,
                                  "pairs": [pair], "under_latency": None})
    assert "| student | fewstep-1 | 1 | 2 | 0.750 / 0.700 | 0.725 | 0.035 |" in md
    thirds = {**pair, "samplers": {**rows, "fewstep-1": {**one, "episodes_below_half": 7 / 3}}}
    md3 = bench_fewstep._markdown({"machine": "m", "date": "d", "uptime_before": "u", "episodes": EPISODES,
                                   "pairs": [thirds], "under_latency": None})
    assert "| 2.3 |" in md3 and "2.333" not in md3
    # a second student of the same teacher: the teacher's rows are shown once, each student's own
    md = bench_fewstep._markdown({"machine": "m", "date": "d", "uptime_before": "u", "episodes": EPISODES,
                                  "pairs": [pair, {**pair, "student": str(student.parent / "other")}],
                                  "under_latency": None})
    assert md.count("| teacher | ddpm-100 |") == 1 and md.count("| other | fewstep-1 |") == 1
    assert "| teacher | other | " in md


def test_pair_refuses_an_evaluation_of_another_sample_seed(runs):
    teacher, student, cache, work = runs
    for sampler, steps in (("ddpm-100", 100), ("ddim-10", 10)):
        _write(work, "teacher", sampler, 0, [1.0] * EPISODES, steps)
    (work / "student_fewstep-1.json").write_text(json.dumps(_report([1.0] * EPISODES, 1, sample_seed=3)))
    with pytest.raises(DpkitError, match="at sample seed 3, not 4 at 0"):
        bench_fewstep._pair(teacher, student, EPISODES, work, cache)


def test_a_one_call_student_gets_fewstep_1_alone(runs):
    teacher, student, cache, work = runs
    shutil.rmtree(student / "checkpoints")
    _student_checkpoint(student, [99])  # distill.timesteps=[99]: no fewstep-2 to score
    for sampler, steps in (("ddpm-100", 100), ("ddim-10", 10), ("fewstep-1", 1)):
        _write(work, "teacher" if steps > 1 else "student", sampler, 0, [1.0, 0.9, 0.9, 0.8], steps)
    pair = bench_fewstep._pair(teacher, student, EPISODES, work, cache)
    assert list(pair["samplers"]) == ["ddpm-100", "ddim-10", "fewstep-1"]
    md = bench_fewstep._markdown({"machine": "m", "date": "d", "uptime_before": "u", "episodes": EPISODES,
                                  "pairs": [pair], "under_latency": None})
    assert "| student | fewstep-1 |" in md and "fewstep-2" not in md


def test_the_student_run_must_be_a_few_step_student(runs):
    teacher, student, cache, work = runs
    shutil.rmtree(student / "checkpoints")
    with pytest.raises(DpkitError, match="has no checkpoint"):
        bench_fewstep._pair(teacher, student, EPISODES, work, cache)
    _student_checkpoint(student, None)  # a diffusion policy given as the student
    with pytest.raises(DpkitError, match="is not a few-step student"):
        bench_fewstep._pair(teacher, student, EPISODES, work, cache)
