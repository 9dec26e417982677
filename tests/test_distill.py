"""Few-step students (dpkit-distill): the step rule in every runtime, a short distillation, resume, bad input.

The rule (dpkit.sampling, kind "fewstep"; cpp/src/schedule.cpp) re-noises the student's x0 to the next
timestep with fresh noise and returns x0 after the last one. Here a `tiny` teacher is distilled for a few
steps on the synthetic store, exported like any run, and sampled in torch, ort and cpp with the same noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dpkit.errors import DpkitError
from dpkit.sampling import SamplerSpec, StepPlan, run_reverse
from dpkit.train.cli import distill_main

def _recipe_timesteps() -> tuple[int, ...]:
    """The timesteps the default recipe (dpkit-distill's --config) gives a student."""
    from dpkit.train.cli import DISTILL_RECIPE
    from dpkit.train.config import load_config

    return tuple(load_config(DISTILL_RECIPE).distill.timesteps)


RECIPE_OVERRIDES = ["train.batch_size=8", "train.log_every=2", "train.val_every=2", "train.checkpoint_every=2",
                    "train.lr_warmup_steps=0"]


def _distill(teacher: Path, out: Path, data: Path, *extra: str, steps: int = 4) -> int:
    try:
        distill_main([str(teacher), "--out", str(out), "--data", str(data), "--train-steps", str(steps),
                      "--no-progress", "--threads", "1", *RECIPE_OVERRIDES, *extra])
    except SystemExit as e:
        return int(e.code)
    return 0


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_runs, synthetic_store) -> Path:
    out = tmp_path_factory.mktemp("distill") / "student"
    summary = out.parent / "summary.json"
    assert _distill(tiny_runs["lowdim"], out, synthetic_store, "--json", str(summary)) == 0
    s = json.loads(summary.read_text())
    assert s["steps"] == 4 and s["teacher"]["step"] == 5 and s["teacher"]["weights"] == "ema"
    return out


@pytest.fixture(scope="module")
def student_bundle(tmp_path_factory, student) -> Path:
    from dpkit.export import export_bundle

    out = tmp_path_factory.mktemp("distill_bundle") / "bundle"
    export_bundle(student, out, log=lambda s: None)
    return out


def test_fewstep_plan_is_the_rule():
    acp = np.linspace(0.999, 0.01, 100)
    schedule = type("S", (), dict(alphas_cumprod=acp, clip_sample=True, clip_sample_range=1.0,
                                  prediction_type="sample"))
    plan = StepPlan.build(schedule, SamplerSpec("fewstep-2", "fewstep", 2, (99, 49), (49, -1), 1.0))
    rng = np.random.default_rng(0)
    x, out, noise = (rng.standard_normal((2, 16, 2), dtype=np.float32) for _ in range(3))
    a = np.float32(acp[49])
    first = plan.step(0, x, out, noise)
    np.testing.assert_array_equal(first, np.sqrt(a) * np.clip(out, -1, 1) + np.sqrt(np.float32(1) - a) * noise)
    np.testing.assert_array_equal(plan.step(1, first, out, None), np.clip(out, -1, 1))  # the last step: x0
    assert plan.uses_step_noise and plan.sigma[1] == 0
    # torch tensors take the same path, bit for bit
    got = plan.step(0, torch.from_numpy(x), torch.from_numpy(out), torch.from_numpy(noise)).numpy()
    np.testing.assert_array_equal(got, first)
    traj = run_reverse(lambda x_t, t: out, plan, x, noise[None].repeat(2, 0))
    np.testing.assert_array_equal(traj, np.clip(out, -1, 1))


def test_student_run_is_a_fewstep_policy_of_the_teachers_network(student, tiny_runs):
    from dpkit.train.checkpoint import load_checkpoint

    s, state = load_checkpoint(student)
    t, _ = load_checkpoint(tiny_runs["lowdim"])
    assert s.cfg.fewstep_timesteps == _recipe_timesteps() and s.cfg.prediction_type == "sample"
    assert s.resolve_sampler() == ("fewstep", 2)
    assert state["teacher"]["checkpoint"].endswith("step_000005")
    assert s.normalizer.to_dict() == t.normalizer.to_dict()
    moved = [k for k, v in s.state_dict().items() if not torch.equal(v, t.state_dict()[k])]
    assert moved, "distillation changed no weight"
    with pytest.raises(DpkitError, match="few-step student: it samples with fewstep"):
        s.resolve_sampler("ddim", 10)


def test_bundle_lists_fewstep_and_every_runtime_agrees(student_bundle):
    from dpkit.runtime import load_policy
    from dpkit.runtime.parity import injected_noise, random_observations

    manifest = json.loads((student_bundle / "policy.json").read_text())
    sched = manifest["scheduler"]
    assert [s["name"] for s in sched["samplers"]] == ["fewstep-1", "fewstep-2"]
    assert sched["default_sampler"] == "fewstep-2" and sched["prediction_type"] == "sample"
    first, second = _recipe_timesteps()
    assert sched["samplers"][1]["timesteps"] == [first, second] and sched["samplers"][1]["prev_timesteps"] == [second, -1]
    assert manifest["parity"]["traj_fewstep"] <= 1e-4
    ort = load_policy(student_bundle, backend="ort")
    cpp = load_policy(student_bundle, backend="cpp")
    obs = random_observations(ort.observations, ort.n_obs_steps, 3, seed=1)
    for k in (1, 2):
        x, noise = injected_noise(3, ort.horizon, ort.action_dim, k, seed=k)
        a = ort.sample(obs, "fewstep", k, initial_noise=x, step_noise=noise)
        b = cpp.sample(obs, "fewstep", k, initial_noise=x, step_noise=noise)
        assert np.max(np.abs(a - b)) <= 1e-5, k
        # seeded calls draw the step noise (one noisy step for fewstep-2)
        np.testing.assert_array_equal(ort.sample(obs, "fewstep", k, seed=3), ort.sample(obs, "fewstep", k, seed=3))
    assert cpp.info["default_sampler"] == "fewstep-2"
    with pytest.raises(DpkitError, match="no sampler ddim"):
        ort.sample(obs, "ddim", 10, seed=0)


def test_student_matches_its_pytorch_policy(student, student_bundle):
    from dpkit.runtime import load_policy
    from dpkit.runtime.parity import random_observations, trajectory_errors

    torch_p = load_policy(student, backend="torch")
    ort = load_policy(student_bundle, backend="ort")
    cpp = load_policy(student_bundle, backend="cpp")
    obs = random_observations(ort.observations, ort.n_obs_steps, 2, seed=4)
    for k in (1, 2):
        errs = trajectory_errors(torch_p, {"ort": ort, "cpp": cpp}, obs, "fewstep", k, seed=5)
        assert max(errs.values()) <= 1e-4, (k, errs)


def test_int8_composes_with_fewstep(student, tmp_path):
    from dpkit.export import export_bundle
    from dpkit.runtime import load_policy

    out = tmp_path / "int8"
    export_bundle(student, out, precision="int8", log=lambda s: None)
    manifest = json.loads((out / "policy.json").read_text())
    assert manifest["models"]["denoiser"]["precision"] == "int8"
    assert "traj_fewstep" in manifest["export"]["quantization_error"]["max"]
    policy = load_policy(out, backend="cpp")
    assert policy.sample(policy_obs(policy), "fewstep", 1, seed=0).shape == (1, policy.horizon, policy.action_dim)


def policy_obs(policy):
    from dpkit.runtime.parity import random_observations

    return random_observations(policy.observations, policy.n_obs_steps, 1, seed=0)


@pytest.mark.parametrize("draws, later, rollouts, energy", [
    (0, "noised_actions", [], 0.0), (2, "noised_actions", [], 0.0), (2, "teacher_path", [], 0.0),
    (1, "noised_actions", [1, 3], 0.0), (1, "noised_actions", [], 0.5), (1, "noised_actions", [], "0.5@3"),
    (0, "student", [], 0.0), (1, "student@3", [], 0.0)])
def test_resume_continues_bit_identically(tiny_runs, synthetic_store, tmp_path, draws, later, rollouts, energy):
    # a constant LR, so the first part's shorter train.steps does not change the schedule; with fixed draws
    # the resumed run restores the targets computed so far from the checkpoint, and with rollouts the
    # windows of the round before it (the round after it runs in the resumed part)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    weight, _, start = str(energy).partition("@")  # "w@s": the term from step s on (in the resumed part)
    later, _, later_from = later.partition("@")  # the same for the student's own states as inputs
    extra = ["train.lr_scheduler=constant", f"distill.draws_per_window={draws}", f"distill.later_inputs={later}",
             f"distill.later_inputs_from={later_from or 0}",
             f"distill.energy_weight={weight}", "distill.energy_rows=4", f"distill.energy_from={start or 0}"]
    if rollouts:
        extra += [f"distill.rollout_at={rollouts}", "distill.rollout_episodes=2"]
    assert _distill(tiny_runs["lowdim"], whole, synthetic_store, *extra, steps=4) == 0
    assert _distill(tiny_runs["lowdim"], parts, synthetic_store, *extra, steps=2) == 0
    from dpkit.train.checkpoint import read_weights, latest_checkpoint, read_state

    cpu_before = read_state(latest_checkpoint(parts))["cpu_s_total"]
    try:
        distill_main(["--out", str(parts), "--resume", "--train-steps", "4", "--no-progress", "--threads", "1"])
    except SystemExit as e:
        assert e.code == 0
    # the cost of the whole student: the resumed run adds its CPU time to the checkpoint's
    resumed = json.loads((parts / "train_summary.json").read_text())
    assert cpu_before > 0 and resumed["cpu_s_total"] == pytest.approx(cpu_before + resumed["cpu_s"])

    a, b = read_weights(latest_checkpoint(whole), "ema"), read_weights(latest_checkpoint(parts), "ema")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if rollouts:
        summary = json.loads((parts / "train_summary.json").read_text())
        assert [r["step"] for r in summary["rollouts"]] == rollouts
        assert [r["seed_start"] for r in summary["rollouts"]] == [0, 2]
        assert summary["rollouts"][1]["total_windows"] == sum(r["windows"] for r in summary["rollouts"])


def _teacher_and_batch(tiny_runs, n: int, seed: int = 0, **distill):
    """A Teacher over the tiny low-dim run (DistillConfig fields in `distill`) and a random batch of n windows."""
    from dpkit.train.config import DistillConfig
    from dpkit.train.distill import Teacher

    cfg = DistillConfig(teacher=str(tiny_runs["lowdim"]), teacher_ddim_steps=5, **distill)
    teacher = Teacher(cfg.teacher, cfg, seed=seed)
    pc = teacher.policy.cfg
    g = torch.Generator().manual_seed(0)
    batch = {"obs": {k: torch.randn(n, pc.n_obs_steps, *shape, generator=g) for k, shape, _ in teacher.policy.obs_specs},
             "action": torch.randn(n, pc.horizon, pc.action_dim, generator=g)}
    return teacher, batch


def test_fixed_draws_are_a_function_of_window_draw_and_seed(tiny_runs):
    teacher, batch = _teacher_and_batch(tiny_runs, 6, seed=7, timesteps=(99, 49), draws_per_window=3)
    torch.manual_seed(1)
    first = teacher.targets(batch)
    assert teacher.teacher_windows == 6 and len(teacher.cache) == 6
    torch.manual_seed(1)
    again = teacher.targets(batch)  # every draw cached: the teacher does not run
    assert teacher.teacher_windows == 6
    teacher.cache.clear()  # what a resumed run starts with: recomputed, the same
    torch.manual_seed(1)
    recomputed = teacher.targets(batch)
    for k in ("noisy", "target", "timestep"):
        assert torch.equal(first[k], again[k]) and torch.equal(first[k], recomputed[k])
    assert set(first["timestep"].tolist()) <= {99, 49}
    other, _ = _teacher_and_batch(tiny_runs, 6, seed=8, timesteps=(99, 49), draws_per_window=3)  # another seed: other draws
    torch.manual_seed(1)
    assert not torch.equal(other.targets(batch)["noisy"], first["noisy"])


def test_cache_saved_before_rollout_windows_still_hits(tiny_runs):
    """A checkpoint written before rollout windows existed keyed a draw-fixed level's targets without the
    level byte: loading it still restores every target (no teacher call), so its resume stays exact."""
    teacher, batch = _teacher_and_batch(tiny_runs, 6, timesteps=(99, 49), draws_per_window=1)
    torch.manual_seed(1)
    first = teacher.targets(batch)
    state = teacher.cache_state()
    assert state["keys"].shape[1] == 17 and bool((state["keys"][:, 16] == 255).all())
    fresh, _ = _teacher_and_batch(tiny_runs, 6, timesteps=(99, 49), draws_per_window=1)
    fresh.load_cache(dict(state, keys=state["keys"][:, :16]))
    torch.manual_seed(1)
    again = fresh.targets(batch)
    assert fresh.teacher_windows == 0
    for k in ("noisy", "target", "timestep"):
        assert torch.equal(again[k], first[k])


@pytest.mark.parametrize("draws", [0, 2])
def test_teacher_path_inputs_are_the_chains_states(tiny_runs, draws):
    from dpkit.sampling import run_reverse

    teacher, batch = _teacher_and_batch(tiny_runs, 12, timesteps=(99, 59, 19), draws_per_window=draws,
                                        later_inputs="teacher_path")
    policy = teacher.policy
    torch.manual_seed(3)
    got = teacher.targets(batch)
    assert teacher.teacher_windows == 12  # one chain per window gives all three levels
    assert len(teacher.cache) == (3 * 12 if draws else 0)
    assert set(got["timestep"].tolist()) == {99, 59, 19}
    with torch.no_grad():
        cond = policy.encoder(*policy._check_obs(got["obs"], check_finite=False))
        for lv, t in enumerate(teacher.timesteps):
            rows = (got["timestep"] == t).nonzero().flatten()

            def denoise(x, tt, c=cond[rows]):
                return policy.denoiser(x, torch.from_numpy(tt), c)

            # the rest of the chain from the level's input is the target: the same steps as a chain from t
            again = run_reverse(denoise, teacher.plans[lv], got["noisy"][rows], None)
            torch.testing.assert_close(again, got["target"][rows], rtol=0, atol=1e-5)
    # the first level's input is the pure noise the chain starts from
    first = got["noisy"][got["timestep"] == 99]
    assert abs(float(first.std()) - 1.0) < 0.15


@pytest.mark.parametrize("draws", [0, 1])
def test_rollout_windows_take_their_share_of_the_batch(tiny_runs, draws):
    """Once rollout windows exist, the last rollout_fraction of a batch's rows are rollout windows whose
    inputs and targets are the teacher's chain from pure noise; validation (rollouts=False) has none."""
    from dpkit.sampling import run_reverse

    teacher, batch = _teacher_and_batch(tiny_runs, 8, timesteps=(99, 59), draws_per_window=draws,
                                        rollout_fraction=0.25)
    torch.manual_seed(3)
    plain = teacher.targets(batch)
    pc = teacher.policy.cfg
    windows = {"obs": torch.randn(5, pc.n_obs_steps, 20, generator=torch.Generator().manual_seed(5))}
    teacher.add_rollout_windows(windows)
    teacher.add_rollout_windows(windows)  # a second round appends
    assert teacher.rollout_windows == 10
    torch.manual_seed(3)
    got = teacher.targets(batch)
    rows = got["obs"]["obs"][6:]
    assert torch.equal(got["obs"]["obs"][:6], batch["obs"]["obs"][:6])
    assert all(any(torch.equal(r, w) for w in windows["obs"]) for r in rows)  # the last 2 rows: rollout windows
    policy = teacher.policy
    with torch.no_grad():
        cond = policy.encoder(rows)
        for j in range(2):
            lv = teacher.timesteps.index(int(got["timestep"][6 + j]))

            def denoise(x, tt, c=cond[j: j + 1]):
                return policy.denoiser(x, torch.from_numpy(tt), c)

            again = run_reverse(denoise, teacher.plans[lv], got["noisy"][6 + j: 7 + j], None)
            torch.testing.assert_close(again, got["target"][6 + j: 7 + j], rtol=0, atol=1e-5)
    torch.manual_seed(3)
    held_out = teacher.targets(batch, rollouts=False)
    for k in ("noisy", "target", "timestep"):
        assert torch.equal(held_out[k], plain[k])
    state = teacher.rollout_state()
    teacher.load_rollouts(state)
    assert teacher.rollout_windows == 10
    from dpkit.errors import DpkitError

    with pytest.raises(DpkitError, match="malformed rollout_windows"):
        teacher.load_rollouts({"obs": state["obs"][:, :1]})


def test_rollouts_collect_the_windows_the_student_acted_on(student):
    from dpkit.eval.evaluate import window_collector
    from dpkit.train.checkpoint import load_checkpoint
    from dpkit.train.config import Config, DistillConfig

    policy, _ = load_checkpoint(student)
    cfg = Config(distill=DistillConfig(rollout_episodes=2, rollout_seed_start=10))
    windows, report = window_collector(cfg)(policy, 1)
    assert report["n_episodes"] == 2 and report["seed_start"] == 12 and report["sample_seed"] == 1
    n = windows["obs"].shape[0]
    assert windows["obs"].shape[1:] == (policy.cfg.n_obs_steps, 20)
    assert 2 <= n <= 2 * (300 // policy.cfg.n_action_steps + 1)
    assert np.isfinite(windows["obs"]).all()
    # the config keeps the rollouts below the protocol's test seeds
    from dpkit.eval import pusht
    from dpkit.train.config import ROLLOUT_SEED_END

    assert ROLLOUT_SEED_END == pusht.LEGACY_TEST_SEED


@pytest.mark.parametrize("draws", [0, 1])
def test_student_inputs_are_what_its_sampler_feeds_the_later_call(tiny_runs, student, draws):
    """later_inputs "student": a later level's input is the student's own first call from the row's noise,
    re-noised by the few-step rule (the StepPlan every runtime runs), and its target the teacher's chain from
    there; the first level's rows are unchanged (pure noise in, cached with fixed draws), and the later inputs
    move with the student's weights."""
    from dpkit.train.checkpoint import load_checkpoint

    pupil, _ = load_checkpoint(student)
    timesteps = pupil.cfg.fewstep_timesteps
    teacher, batch = _teacher_and_batch(tiny_runs, 16, timesteps=timesteps, draws_per_window=draws,
                                        later_inputs="student")
    with pytest.raises(RuntimeError, match="attach_student"):
        torch.manual_seed(3)
        teacher.targets(batch)
    teacher.attach_student(pupil)
    torch.manual_seed(3)
    got = teacher.targets(batch)
    first = (got["timestep"] == timesteps[0]).nonzero().flatten()
    later = (got["timestep"] == timesteps[1]).nonzero().flatten()
    assert len(first) and len(later) and len(first) + len(later) == 16
    assert len(teacher.cache) == (len(first) if draws else 0)  # only the first level's targets are kept

    # replay the draws: the row's noise z, then one fresh normal per later row for the re-noise
    torch.manual_seed(3)
    if draws:
        keys = teacher.draw_keys(batch["obs"], batch["action"], torch.randint(0, draws, (16,)))
        _, z = teacher.draw_inputs(keys, batch["action"])
    else:
        torch.randint(0, 2, (16,))
        z = torch.randn_like(batch["action"])
    renoise = torch.randn(len(later), *z.shape[1:])
    plan = pupil.step_plan("fewstep", 2)
    with torch.no_grad():
        cond = pupil.encoder(*pupil._check_obs(batch["obs"], check_finite=False))
        out = pupil.denoiser(z[later], torch.full((len(later),), timesteps[0]), cond[later])
        want = plan.step(0, z[later], out, renoise)
    torch.testing.assert_close(got["noisy"][later], want, rtol=0, atol=1e-6)
    assert torch.equal(got["noisy"][first], z[first])
    policy = teacher.policy
    with torch.no_grad():
        tcond = policy.encoder(*policy._check_obs(batch["obs"], check_finite=False))
        for lv, rows in ((0, first), (1, later)):
            def denoise(x, tt, c=tcond[rows]):
                return policy.denoiser(x, torch.from_numpy(tt), c)

            again = run_reverse(denoise, teacher.plans[lv], got["noisy"][rows], None)
            torch.testing.assert_close(again, got["target"][rows], rtol=0, atol=1e-5)
    # the student moves: its later inputs follow, the first level's stay
    with torch.no_grad():
        for p in pupil.denoiser.parameters():
            p.mul_(0.9)
    torch.manual_seed(3)
    moved = teacher.targets(batch)
    assert torch.equal(moved["noisy"][first], got["noisy"][first])
    assert torch.equal(moved["target"][first], got["target"][first])
    assert not torch.allclose(moved["noisy"][later], got["noisy"][later])


def test_teacher_path_needs_timesteps_on_the_chain(tiny_runs):
    from dpkit.errors import DpkitError

    with pytest.raises(DpkitError, match=r"timesteps \[49\] are not on the teacher's chain from 99 in steps of 20"):
        _teacher_and_batch(tiny_runs, 1, timesteps=(99, 49), later_inputs="teacher_path")


def test_unexecuted_weight_puts_the_loss_on_the_executed_steps(tiny_runs):
    teacher, batch = _teacher_and_batch(tiny_runs, 3, timesteps=(99, 49), unexecuted_weight=0.25)
    policy = teacher.policy
    pc = policy.cfg
    torch.manual_seed(1)
    prepared = teacher.targets(batch)
    executed = range(pc.n_obs_steps - 1, pc.n_obs_steps - 1 + pc.n_action_steps)
    assert prepared["weight"].tolist() == [1.0 if i in executed else 0.25 for i in range(pc.horizon)]
    with torch.no_grad():
        loss = float(policy(prepared))
        cond = policy.encoder(*policy._check_obs(prepared["obs"], check_finite=False))
        err = (policy.denoiser(prepared["noisy"], prepared["timestep"], cond) - prepared["target"]).square()
        plain = float(policy({k: v for k, v in prepared.items() if k != "weight"}))
    w = prepared["weight"][None, :, None]
    assert loss == pytest.approx(float((err * w).sum() / (w.sum() * err.shape[0] * err.shape[2])), rel=1e-6)
    assert plain == pytest.approx(float(err.mean()), rel=1e-6) and plain != pytest.approx(loss, rel=1e-3)
    # the default (1.0) is the plain MSE: no weight in the batch
    torch.manual_seed(1)
    assert "weight" not in _teacher_and_batch(tiny_runs, 3)[0].targets(batch)


def test_pseudo_huber_loss_is_per_window(tiny_runs):
    teacher, batch = _teacher_and_batch(tiny_runs, 4, timesteps=(99, 49), unexecuted_weight=0.5, pseudo_huber=0.05)
    policy = teacher.policy
    torch.manual_seed(1)
    prepared = teacher.targets(batch)
    assert prepared["pseudo_huber"] == 0.05
    with torch.no_grad():
        loss = float(policy(prepared))
        cond = policy.encoder(*policy._check_obs(prepared["obs"], check_finite=False))
        err = (policy.denoiser(prepared["noisy"], prepared["timestep"], cond) - prepared["target"]).square()
    w = prepared["weight"][None, :, None]
    e = (err * w).sum(dim=(1, 2)) / (w.sum() * err.shape[2])  # each window's weighted mean square
    assert loss == pytest.approx(float(((e + 0.05 ** 2).sqrt() - 0.05).mean()), rel=1e-5)
    assert loss != pytest.approx(float(e.mean()), rel=1e-2)
    # unweighted: the same per-window form over the plain mean square
    torch.manual_seed(1)
    plain = _teacher_and_batch(tiny_runs, 4, timesteps=(99, 49), pseudo_huber=0.05)[0].targets(batch)
    assert "weight" not in plain
    with torch.no_grad():
        err = (policy.denoiser(plain["noisy"], plain["timestep"], cond) - plain["target"]).square()
        e = err.mean(dim=(1, 2))
        assert float(policy(plain)) == pytest.approx(float(((e + 0.05 ** 2).sqrt() - 0.05).mean()), rel=1e-5)


def test_energy_score_is_proper_and_as_defined():
    from dpkit.train.policy import energy_score

    # by hand: two samples of one window (H = A = 1), c = 0 takes the tiny scale 1e-4
    x = torch.tensor([[[[1.0]]], [[[-2.0]]]])
    y = torch.tensor([[[0.5]]])
    assert float(energy_score(x, y, None, 0.0)) == pytest.approx(0.5 * (0.5 + 2.5) - 0.5 * 3.0, abs=1e-3)
    # proper: against data from N(0, 1), samples from N(0, 1) score lower than narrower or wider ones, in
    # expectation (many windows) and with the loss's weighted pseudo-Huber distance
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4000, 4, 2, generator=g)
    w = torch.tensor([1.0, 1.0, 0.1, 0.1])
    scores = {scale: float(energy_score(scale * torch.randn(4, 4000, 4, 2, generator=g), y, w, 0.002))
              for scale in (0.6, 1.0, 1.5)}
    assert scores[1.0] < scores[0.6] - 0.01 and scores[1.0] < scores[1.5] - 0.01, scores
    # a regression's optimum, every sample at the conditional mean, scores worse than the spread samples
    assert float(energy_score(torch.zeros(4, 4000, 4, 2), y, w, 0.002)) > scores[0.6]


def test_energy_term_scores_the_students_own_fewstep_samples(student, tiny_runs):
    from dpkit.train.checkpoint import load_checkpoint
    from dpkit.train.policy import energy_score

    policy, _ = load_checkpoint(latest_checkpoint_of(student), ema=True)
    ts = tuple(policy.cfg.fewstep_timesteps)
    teacher, batch = _teacher_and_batch(tiny_runs, 5, timesteps=ts, unexecuted_weight=0.5, pseudo_huber=0.01,
                                        energy_weight=0.7, energy_rows=3, energy_samples=3)
    torch.manual_seed(2)
    prepared = teacher.targets(batch)
    e = prepared["energy"]
    assert e["weight"] == 0.7 and e["noise"].shape == (3, len(ts), 3, *batch["action"].shape[1:])
    assert torch.equal(e["target"], teacher.policy.normalizer.normalize("action", batch["action"])[:3])
    torch.manual_seed(2)
    assert "energy" not in teacher.targets(batch, energy=False)  # validation: the regression alone
    without = _teacher_and_batch(tiny_runs, 5, timesteps=ts, unexecuted_weight=0.5, pseudo_huber=0.01)[0]
    torch.manual_seed(2)
    plain = without.targets(batch)
    assert "energy" not in plain and torch.equal(plain["target"], prepared["target"])
    policy.eval()
    with torch.no_grad():
        term = float(policy(prepared)) - float(policy(plain))
        # each sample is what the student's own sampler makes of that noise (fewstep-k, k = 1 .. calls)
        obs = {k: v[:3] for k, v in batch["obs"].items()}
        none = torch.zeros_like(e["noise"][0, :1])  # the last step adds no noise
        per_call = []
        for k in range(1, len(ts) + 1):
            # step j's noise re-noises before call j + 1; the last step adds none
            out = torch.stack([policy.sample(obs, "fewstep", k, initial_noise=e["noise"][s, 0],
                                             step_noise=torch.cat([e["noise"][s, 1:k], none]))
                               for s in range(3)])
            per_call.append(float(energy_score(out, e["target"], prepared["weight"], 0.01)))
    assert term == pytest.approx(0.7 * sum(per_call) / len(per_call), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("phase", [["distill.energy_weight=0.5", "distill.energy_from=2"],
                                   ["distill.later_inputs=student", "distill.later_inputs_from=2"]])
def test_a_later_phase_leaves_the_first_steps_to_the_regression(tiny_runs, synthetic_store, tmp_path, phase):
    """energy_from / later_inputs_from: the first steps are those of the plain recipe, bit for bit."""
    from dpkit.train.checkpoint import read_weights

    common = ["train.lr_scheduler=constant", "distill.draws_per_window=1", "train.checkpoint_every=1",
              "train.keep_checkpoints=3", "distill.energy_rows=4"]
    runs = {"plain": ["distill.energy_weight=0"], "from2": phase}
    for name, extra in runs.items():
        assert _distill(tiny_runs["lowdim"], tmp_path / name, synthetic_store, *common, *extra, steps=3) == 0

    def weights(name, step):
        return read_weights(tmp_path / name / "checkpoints" / f"step_{step:06d}", "ema")

    for step, same in ((2, True), (3, False)):  # two steps of the regression alone, then the term joins
        a, b = weights("plain", step), weights("from2", step)
        assert all(torch.equal(a[k], b[k]) for k in a) is same, step


def latest_checkpoint_of(run: Path) -> Path:
    from dpkit.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run)


@pytest.mark.parametrize("case, expect", [
    ("energy_samples", "distill.energy_samples must be in [2, 64], got 1"),
    ("not_a_run", "is not a dpkit run folder or checkpoint"),
    ("missing", "no such run folder"),
    ("mismatch", "the student's policy.down_dims = (16, 32) does not match the teacher's (32, 64)"),
    ("student_teacher", "is itself a few-step student"),
    ("bad_timesteps", "must be distinct, descending and in [0, num_train_timesteps=100), got [150, 49]"),
])
def test_bad_input_is_one_line(case, expect, tiny_runs, synthetic_store, student, tmp_path, capsys):
    teacher, extra = tiny_runs["lowdim"], []
    if case == "not_a_run":
        teacher = tmp_path / "empty"
        teacher.mkdir()
    elif case == "missing":
        teacher = tmp_path / "nope"
    elif case == "mismatch":
        extra = ["policy.down_dims=[16,32]"]
    elif case == "student_teacher":
        teacher = student
    elif case == "bad_timesteps":
        extra = ["distill.timesteps=[150,49]"]
    elif case == "energy_samples":
        extra = ["distill.energy_weight=1", "distill.energy_samples=1"]
    out = tmp_path / "out"
    assert _distill(teacher, out, synthetic_store, *extra) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not (out / "checkpoints").exists()


def test_malformed_fewstep_sampler_refused_by_both_readers(student_bundle, tmp_path):
    from dpkit.runtime import load_policy

    bad = tmp_path / "bad"
    shutil.copytree(student_bundle, bad)
    manifest = json.loads((bad / "policy.json").read_text())
    manifest["scheduler"]["samplers"][1]["prev_timesteps"] = [40, -1]
    (bad / "policy.json").write_text(json.dumps(manifest))
    for backend in ("ort", "cpp"):
        with pytest.raises(DpkitError, match=r"prev_timesteps of a fewstep sampler must be its timesteps\[1:\] then -1"):
            load_policy(bad, backend=backend)


def test_converted_image_policy_distills_end_to_end(synthetic_store, tmp_path):
    """The smoke test of issue 16: a policy converted from the original code's own checkpoint (ResNet-18 image
    encoder) as the teacher; a few steps; export; the C++ runtime samples fewstep-1 and fewstep-2. No score."""
    import lzma

    from dpkit.convert.source import convert_policy
    from dpkit.export import export_bundle
    from dpkit.runtime import load_policy

    ckpt = tmp_path / "latest.ckpt"
    with lzma.open(Path(__file__).parent / "data" / "peers" / "original_pusht_hybrid_tiny" / "latest.ckpt.xz") as f:
        ckpt.write_bytes(f.read())
    convert_policy(ckpt, tmp_path / "teacher")
    # the student's own states as the second call's inputs: the image encoder runs in the student's loop too
    assert _distill(tmp_path / "teacher", tmp_path / "student", synthetic_store, "distill.later_inputs=student",
                    steps=2) == 0
    export_bundle(tmp_path / "student", tmp_path / "bundle", log=lambda s: None)
    cpp = load_policy(tmp_path / "bundle", backend="cpp")
    assert cpp.info["default_sampler"] == "fewstep-2"
    obs = policy_obs(cpp)
    for k in (1, 2):
        traj = cpp.sample(obs, "fewstep", k, seed=0)
        assert traj.shape == (1, cpp.horizon, cpp.action_dim) and np.all(np.isfinite(traj))


@pytest.mark.parametrize("execution", ["sync", "async-inpaint"])
def test_realtime_controllers_run_the_student(student_bundle, execution):
    """The C++ real-time controller samples fewstep chunks exactly as the Python reference does."""
    from test_cpp_realtime import SEED, CppNoise, _drive, _stream

    from dpkit.runtime import load_policy
    from dpkit.runtime.realtime import CppRealTimeController, RealTimeController, make_controller

    policy = load_policy(student_bundle, backend="cpp", threads=1, max_batch=2)
    stream = _stream(policy, 60)
    kwargs = dict(execution=execution, delay=2, blend=1 if execution == "async-inpaint" else 0, seed=SEED,
                  sampler="fewstep", steps=1)
    cpp = make_controller(policy, **kwargs)
    assert isinstance(cpp, CppRealTimeController)
    got, _, stats = _drive(cpp, stream)
    want, _, _ = _drive(RealTimeController(CppNoise(policy, SEED), **kwargs), stream)
    np.testing.assert_array_equal(got, want)
    assert stats.chunks >= 60 // (policy.n_action_steps + 2)


def test_spread_benchmark_compares_the_student_with_its_teacher(tiny_bundles, student_bundle, tmp_path, capsys,
                                                                monkeypatch):
    from dpkit.benchmarks import fewstep_spread

    monkeypatch.setenv("DPKIT_THREADS", "1")  # --threads sets it; monkeypatch puts it back

    def run(*args: str) -> int:
        with pytest.raises(SystemExit) as e:
            fewstep_spread.main(["--teacher", str(tiny_bundles["lowdim"]), "--threads", "1", *args])
        return int(e.value.code)

    out = tmp_path / "spread.json"
    assert run("--student", str(student_bundle), "--states", "3", "--chunks", "2", "--samples", "4",
               "--json", str(out)) == 0
    result = json.loads(out.read_text())
    rows = result["samplers"]
    n = len(_recipe_timesteps())
    assert list(rows) == ["ddpm-100", "ddim-10"] + [f"bundle fewstep-{k}" for k in range(1, n + 1)]
    assert rows["ddpm-100"]["of_teacher_ddpm100"] == 1.0 and rows["ddpm-100"]["mean_offset_px"] == 0.0
    assert all(r["spread_px"] > 0 and np.isfinite(r["mean_offset_px"]) for r in rows.values())
    # --goal-distance: the states of whole episodes whose block lies in the band (here every state: the tiny
    # teacher's episodes are short), evenly spread; a band no state lies in is one clear line
    assert run("--student", str(student_bundle), "--goal-distance", "0,1e9", "--episodes", "1", "--states", "2",
               "--samples", "2", "--json", str(out)) == 0
    near = json.loads(out.read_text())
    assert near["states"] == 2 and near["goal_distance_px"] == [0.0, 1e9] and near["episodes"] == 1
    assert near["states_in_band"] == near["states_seen"] >= 2
    capsys.readouterr()
    assert run("--student", str(student_bundle), "--goal-distance", "0,0.001", "--episodes", "1",
               "--samples", "2") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "px from the goal (their distances:" in err[0], err
    # a teacher bundle is not a student's: one clear line
    capsys.readouterr()
    assert run("--student", str(tiny_bundles["lowdim"]), "--states", "1", "--samples", "2") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a few-step student's bundle" in err[0], err


def test_goal_distance_is_zero_at_the_goal_and_grows_with_the_offset():
    from dpkit.benchmarks.fewstep_spread import goal_distance
    from dpkit.eval.pusht import GOAL_POSE, block_keypoints

    x, y, a = GOAL_POSE
    obs = np.zeros((3, 2, 20))
    for i, pose in enumerate([(x, y, a), (x + 30.0, y, a), (x, y - 40.0, a)]):
        obs[i, -1, :18] = block_keypoints(np.array(pose)).reshape(-1)
    assert np.allclose(goal_distance(obs), [0.0, 30.0, 40.0])


def test_spread_summary_is_relative_to_the_teachers_ddpm():
    from dpkit.benchmarks.fewstep_spread import summarize

    means = np.zeros((2, 8, 2))
    raw = {"ddpm-100": (np.array([10.0, 30.0]), means), "student": (np.array([5.0, 15.0]), means + [3.0, 4.0])}
    got = summarize(raw)
    assert got["student"] == {"spread_px": 10.0, "of_teacher_ddpm100": 0.5, "median_ratio": 0.5,
                              "mean_offset_px": 5.0}


def test_handoff_is_the_students_first_call_then_the_teachers_chain(tiny_runs, student, tmp_path, capsys):
    """benchmarks/fewstep_handoff: the student's first call, re-noised to the level by the few-step rule, then
    the teacher's DDIM chain from there; scored like dpkit-eval; bad input is one line."""
    from dpkit.benchmarks import fewstep_handoff
    from dpkit.train.checkpoint import load_checkpoint
    from dpkit.train.distill import ode_chain

    teacher, _ = load_checkpoint(tiny_runs["lowdim"])
    pupil, _ = load_checkpoint(student)
    handoff = fewstep_handoff.Handoff(teacher, pupil, 49, 10)
    g = torch.Generator().manual_seed(0)
    pc = pupil.cfg
    obs = {k: torch.randn(3, pc.n_obs_steps, *shape, generator=g) for k, shape, _ in pupil.obs_specs}
    z, n = (torch.randn(3, pc.horizon, pc.action_dim, generator=g) for _ in range(2))
    got = handoff.sample(obs, z, n)
    with torch.no_grad():
        x0 = pupil.sample(obs, "fewstep", 1, initial_noise=z)  # the first call's (clipped) x0
        a = float(np.float32(pupil.schedule_arrays.alphas_cumprod[49]))
        x = np.float32(np.sqrt(a)) * x0 + np.float32(np.sqrt(np.float32(1) - a)) * n
        plan = StepPlan.build(teacher.schedule_arrays, ode_chain(49, 10))
        cond = teacher.encoder(*teacher._check_obs(obs, check_finite=False))
        want = run_reverse(lambda xt, tt: teacher.denoiser(xt, torch.from_numpy(tt), cond), plan, x, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    out = tmp_path / "handoff.json"
    common = ["--teacher", str(tiny_runs["lowdim"]), "--student", str(student), "--episodes", "2",
              "--max-steps", "16", "--threads", "1", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        fewstep_handoff.main([*common, "--level", "49", "--json", str(out)])
    assert e.value.code in (0, None)
    report = json.loads(out.read_text())
    assert 0.0 <= report["score"] <= 1.0 and report["n_episodes"] == 2
    assert report["handoff"]["level"] == 49 and report["handoff"]["teacher_calls"] == 5
    for bad, expect in ((["--level", str(_recipe_timesteps()[0])], "--level must be in [0, 99)"),
                        (["--level", "9", "--teacher-ddim-steps", "0"], "--teacher-ddim-steps must be in [1, 100]")):
        with pytest.raises(SystemExit) as e:
            fewstep_handoff.main([*common, *bad])
        assert e.value.code != 0 and expect in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        fewstep_handoff.main(["--teacher", str(student), "--student", str(student), "--level", "9", "--threads", "1"])
    assert e.value.code != 0 and "--teacher is a few-step student" in capsys.readouterr().err


def test_later_epsilon_student_starts_from_its_teachers_one_call_estimate(tiny_runs, synthetic_store, tmp_path):
    """distill.later_epsilon: at the later timesteps the student's network predicts the noise and its denoiser
    returns x0 = (x - sqrt(1 - a) eps) / sqrt(a), so with its teacher's weights it is the teacher's one-call
    estimate there; at the first timestep it predicts x0 directly. The mix is in the exported graph: the
    bundle still outputs x0, and torch, ort and cpp agree on fewstep-1 and -2 (fp32 and int8)."""
    import dataclasses

    from dpkit.export import export_bundle
    from dpkit.runtime import load_policy
    from dpkit.runtime.parity import random_observations, trajectory_errors
    from dpkit.train.checkpoint import load_checkpoint
    from dpkit.train.config import DistillConfig
    from dpkit.train.distill import student_policy
    from dpkit.train.policy import DiffusionPolicy

    teacher, _ = load_checkpoint(tiny_runs["lowdim"])
    cfg = student_policy(teacher.cfg, DistillConfig(timesteps=(99, 29), later_epsilon=True))
    pupil = DiffusionPolicy(cfg, teacher.normalizer)
    pupil.load_state_dict(teacher.state_dict())  # the mix is no weight: the teacher's state dict loads as is
    assert "denoiser.out_skip" not in pupil.state_dict()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, cfg.horizon, cfg.action_dim, generator=g)
    c = torch.randn(4, pupil.cond_dim, generator=g)
    acp = teacher.noise_scheduler.alphas_cumprod.double()
    with torch.no_grad():
        for t in (99, 29, 50):
            tt = torch.full((4,), t)
            eps = teacher.denoiser(x, tt, c)
            got = pupil.denoiser(x, tt, c)
            if t == 29:  # a later timestep: the teacher's one-call x0
                a = acp[t]
                want = ((x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).float()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:  # the first, and any other timestep: the U-Net's output as it is
                assert torch.equal(got, eps)
    with pytest.raises(DpkitError, match="fewstep_later_epsilon is for a few-step student"):
        dataclasses.replace(teacher.cfg, fewstep_later_epsilon=True).validate()

    out = tmp_path / "student"
    assert _distill(tiny_runs["lowdim"], out, synthetic_store, "distill.later_epsilon=true",
                    "distill.later_inputs=student", steps=2) == 0
    s, _ = load_checkpoint(out)
    assert s.cfg.fewstep_later_epsilon and s.denoiser.out_skip is not None
    for precision in ("fp32", "int8"):
        bundle = tmp_path / precision
        export_bundle(out, bundle, precision=precision, log=lambda s: None)
        manifest = json.loads((bundle / "policy.json").read_text())
        assert manifest["scheduler"]["prediction_type"] == "sample"
        if precision == "fp32":
            assert manifest["parity"]["traj_fewstep"] <= 1e-4
            ort = load_policy(bundle, backend="ort")
            cpp = load_policy(bundle, backend="cpp")
            obs = random_observations(ort.observations, ort.n_obs_steps, 2, seed=4)
            for k in (1, 2):
                errs = trajectory_errors(load_policy(out, backend="torch"), {"ort": ort, "cpp": cpp}, obs, "fewstep",
                                         k, seed=5)
                assert max(errs.values()) <= 1e-4, (k, errs)


def test_the_two_call_recipe_is_the_recipe_with_its_documented_changes():
    """pusht_lowdim_cpu_distill_2call: the measured V student as a named config (docs/fewstep-distillation.md,
    "The second call")."""
    import dataclasses

    from dpkit.train.cli import DISTILL_RECIPE
    from dpkit.train.config import load_config

    base, two = load_config(DISTILL_RECIPE), load_config("pusht_lowdim_cpu_distill_2call")
    changed = {f.name: getattr(two.distill, f.name) for f in dataclasses.fields(two.distill)
               if getattr(two.distill, f.name) != getattr(base.distill, f.name)}
    assert changed == {"later_inputs": "student", "later_inputs_from": 2400, "later_epsilon": True}
    assert two.train.steps == 3800 and dataclasses.replace(two.train, steps=base.train.steps) == base.train
