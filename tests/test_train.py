"""The trainer, its checkpoints and the dpkit-train CLI, on small synthetic stores."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpkit.errors import DpkitError
from dpkit.train import checkpoint as ckpt_io
from dpkit.train.cli import main as cli_main
from dpkit.train.config import load_config
from dpkit.sampling_args import MAX_SEED
from dpkit.train.trainer import EMA, EpochBatches, seed_everything, train
from synthetic import SMALL_TRAIN as SMALL
from synthetic import make_synthetic_pusht

ROOT = Path(__file__).resolve().parents[1]
# A very small U-Net keeps each run to a couple of seconds on 2 cores.


@pytest.fixture(scope="module")
def store(train_store) -> Path:
    return train_store


def _cfg(store, *extra):
    return load_config("tiny", [*SMALL, f"data.path={store}", *extra])


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_resume_continues_exactly(store, tmp_path):
    cfg = _cfg(store, "train.steps=8", "train.checkpoint_every=100", "train.grad_accum_steps=2", "train.batch_size=4")
    straight = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after=4)
    assert [p.name for p in ckpt_io.step_dirs(tmp_path / "b")] == ["step_000004"]
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # as if it died after the checkpoint, mid-write
        f.write('{"step": 5, "loss": 9.0}\n{"step": 6, "lo')
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 9))  # metrics.jsonl reads as one run
    np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], rtol=0, atol=1e-6)
    assert len(set(a.values())) == 8  # not a constant curve that would pass trivially
    assert straight["steps"] == resumed["steps"] == 8 and resumed["steps_this_run"] == 4
    wa = ckpt_io.read_weights(tmp_path / "a" / "checkpoints" / "step_000008", "ema")
    wb = ckpt_io.read_weights(tmp_path / "b" / "checkpoints" / "step_000008", "ema")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / "b" / "train_summary.json").read_text())
    assert summary["checkpoint"].endswith("step_000008") and summary["val_loss"] is not None


def test_checkpoints_rotation_latest_and_loading(store, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(store, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.log_every=3")
    train(cfg, run, progress=False)
    assert [p.name for p in ckpt_io.step_dirs(run)] == ["step_000004", "step_000006"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp leftovers
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert all(k in records[0] for k in ("loss", "lr", "samples_per_s")) and "val_loss" in records[0]

    policy, state = ckpt_io.load_checkpoint(run)  # run folder -> latest, EMA weights
    assert state["step"] == 6 and state["config"]["name"] == "tiny" and "action" in state["normalizer"]
    assert not policy.training
    model, _ = ckpt_io.load_checkpoint(run / "checkpoints" / "step_000006", ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), model.state_dict().values()))
    obs = {"obs": torch.full((3, 2, 20), 250.0)}
    act = policy.predict_action(obs, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(0))
    assert act.shape == (3, 8, 2) and torch.isfinite(act).all()


def test_damaged_checkpoints_name_the_file(store, tmp_path):
    run = tmp_path / "run"
    train(_cfg(store, "train.steps=1"), run, progress=False)
    ck = run / "checkpoints" / "step_000001"
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(DpkitError, match=r"model\.safetensors is corrupt or truncated"):
        ckpt_io.load_checkpoint(run)
    weights.write_bytes(data)
    (ck / "state.json").write_text('{"format": "dpkit-checkpoint", "conf')
    with pytest.raises(DpkitError, match=r"state\.json is corrupt or truncated"):
        ckpt_io.load_checkpoint(ck)
    (ck / "state.json").unlink()
    with pytest.raises(DpkitError, match=r"state\.json is missing"):
        ckpt_io.load_checkpoint(ck)
    (ck / "trainer_state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(DpkitError, match=r"trainer_state\.pt is corrupt"):
        ckpt_io.read_trainer_state(ck)
    good = {"format": "dpkit-checkpoint", "format_version": 1, "step": 1, "config": {}, "normalizer": {}}
    (ck / "state.json").write_text(json.dumps({**good, "format_version": "one"}))
    with pytest.raises(DpkitError, match="format_version must be an integer"):
        ckpt_io.read_state(ck)
    from dpkit.train.normalizer import Normalizer

    with pytest.raises(DpkitError, match=r"normalizer action\.min must be a list of numbers"):
        Normalizer.from_dict({"action": {"min": ["a"], "max": [1.0], "scale": [1.0], "offset": [0.0]}})
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe garbage")  # ignored: the highest step folder wins
    assert ckpt_io.latest_checkpoint(run) == ck
    with pytest.raises(DpkitError, match="holds no checkpoint"):
        ckpt_io.load_checkpoint(tmp_path)
    with pytest.raises(DpkitError, match="does not exist"):
        ckpt_io.load_checkpoint(tmp_path / "nowhere")


def _cli(*argv) -> int:
    with pytest.raises(SystemExit) as e:
        cli_main(list(argv))
    return e.value.code


def test_cli_run_refuse_resume_force_and_bad_input(store, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--config", "tiny", "--data", str(store), "--out", str(run), "--no-progress", *SMALL]
    assert _cli(*base, "--steps", "2", "--json", str(tmp_path / "s.json")) == 0
    assert json.loads((tmp_path / "s.json").read_text())["steps"] == 2
    capsys.readouterr()
    assert _cli(*base, "--steps", "3") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--resume" in err and err.count("\n") == 1
    assert _cli("--out", str(run), "--resume", "--steps", "3", "--no-progress") == 0
    assert ckpt_io.read_state(ckpt_io.latest_checkpoint(run))["step"] == 3
    assert _cli(*base, "--steps", "1", "--force") == 0
    assert [p.name for p in ckpt_io.step_dirs(run)] == ["step_000001"]
    assert sorted(_losses(run)) == [1]

    capsys.readouterr()
    for argv, message in [
        ([*base, "--steps", "1", "--resume", "--force"], "contradict"),
        (["--out", str(tmp_path / "empty"), "--resume"], "no checkpoint"),
        (["--config", "tiny", "--out", str(tmp_path / "x"), "train.no_such_key=1"], "unknown config key"),
        (["--config", "nope"], "not found"),
        (["--config", "tiny", "--data", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "y")], "does not exist"),
        ([*base, "data.max_train_episodes=abc"], "data.max_train_episodes expects a number"),
        ([*base, "data.path=[1]"], "data.path expects a string"),
        ([*base, "policy.down_dims=[a,b]"], "policy.down_dims[0] expects a number"),
        ([*base, "train.betas=[0.9]"], "train.betas must be a list of 2"),
        ([*base, "train.weight_decay=-1"], "train.weight_decay must be >= 0"),
        ([*base, "policy.clip_sample=1"], "policy.clip_sample must be true or false"),
    ]:
        assert _cli(*argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    # --force with a mistyped --data fails before it removes the earlier run.
    assert _cli(*base, "--data", str(tmp_path / "typo.zarr"), "--steps", "1", "--force") == 1
    assert [p.name for p in ckpt_io.step_dirs(run)] == ["step_000001"] and sorted(_losses(run)) == [1]


def test_validation_steps_need_not_be_log_steps(store, tmp_path):
    run = tmp_path / "run"
    train(_cfg(store, "train.steps=6", "train.log_every=2", "train.val_every=3"), run, progress=False)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 3, 4, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]


def test_seeds_at_the_limit_train_and_match_accelerate_below_2_32(store, tmp_path):
    """MAX_SEED (2**63 - 1) is one limit for every seed: a run with train.seed and data.split_seed at it trains,
    and seed_everything gives accelerate's set_seed draws for the seeds that set_seed takes."""
    import random

    from accelerate.utils import set_seed

    run = tmp_path / "run"
    train(_cfg(store, "train.steps=2", f"train.seed={MAX_SEED}", f"data.split_seed={MAX_SEED}"), run, progress=False)
    assert all(math.isfinite(v) for v in _losses(run).values())
    draws = []
    for seed_fn, seed in ((set_seed, 2**32 - 1), (seed_everything, 2**32 - 1)):
        seed_fn(seed)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
    seed_everything(MAX_SEED)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(MAX_SEED - 2**32)  # same low word: numpy must still differ
    assert np.random.rand() != a[1]


def test_time_limit_stops_with_a_checkpoint_that_resumes(store, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(store, "train.steps=1000", "train.time_limit_s=0.5", "train.checkpoint_every=1000")
    summary = train(cfg, run, progress=False)
    assert summary["stopped_by_time_limit"] and 1 <= summary["steps"] < 1000
    assert ckpt_io.read_state(ckpt_io.latest_checkpoint(run))["step"] == summary["steps"]
    assert max(_losses(run)) == summary["steps"]
    cfg2 = _cfg(store, f"train.steps={summary['steps'] + 2}", "train.checkpoint_every=1000")
    assert train(cfg2, run, resume=True, progress=False)["steps"] == summary["steps"] + 2


def test_image_mode_trains_and_reloads(tmp_path):
    store = make_synthetic_pusht(tmp_path / "img.zarr", lengths=[18, 22])
    cfg = load_config(
        "tiny",
        [*SMALL, f"data.path={store}", "policy.obs_mode=image", "policy.resnet_width=8", "train.batch_size=4",
         "train.steps=2", "data.val_ratio=0"],
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["val_loss"] is None and np.isfinite(summary["final_loss"])
    policy, state = ckpt_io.load_checkpoint(tmp_path / "run")
    assert state["config"]["policy"]["obs_mode"] == "image" and set(state["normalizer"]) == {"action", "agent_pos"}


def test_rollout_hook_keeps_best_checkpoint(store, tmp_path, monkeypatch):
    import dpkit.eval.evaluate as evaluate

    scores = iter([0.3, 0.7, 0.5])
    seen = []

    def fake_evaluate(policy, episodes, max_steps, **kw):
        seen.append((policy.obs_mode, tuple(policy.obs_keys), episodes, max_steps))
        actions = policy.predict_action({"obs": np.full((1, 2, 20), 250.0, dtype=np.float32)})
        assert actions.shape == (1, 8, 2)
        return {"score": next(scores)}

    monkeypatch.setattr(evaluate, "evaluate_policy", fake_evaluate)
    run = tmp_path / "run"
    cfg = _cfg(store, "train.steps=3", "train.eval_every=1", "train.eval_episodes=2", "train.eval_max_steps=5",
               "policy.ddim_steps=2")
    summary = train(cfg, run, progress=False, rollout_eval=evaluate.rollout_evaluator(cfg))
    assert seen == [("lowdim", ("obs",), 2, 5)] * 3
    assert summary["best_score"] == 0.7
    best = ckpt_io.read_state(run / "checkpoints" / "best")
    assert best["step"] == 2 and best["metrics"]["score"] == 0.7
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_paper_protocol_summary_over_the_last_evaluations(store, tmp_path, monkeypatch, capsys):
    """train.eval_samplers x train.eval_last: each evaluation runs every sampler through the dpkit-eval
    code path; train_summary.json and the CLI's last lines give max/mean of the last N, per sampler, and
    a resumed run's summary still counts the evaluations made before it stopped."""
    import dpkit.eval.evaluate as evaluate

    calls = []

    def fake_evaluate(policy, episodes, max_steps, sampler=None, steps=None, **kw):
        calls.append((sampler, steps, episodes))
        n = len(calls)
        return {"score": 0.1 * n, "success_rate": 0.01 * n, "episodes": [{"seed": 0}], "videos": []}

    monkeypatch.setattr(evaluate, "evaluate_policy", fake_evaluate)
    run = tmp_path / "run"
    args = ["--config", "tiny", "--out", str(run), "--no-progress", *SMALL, f"data.path={store}",
            "train.eval_every=2", "train.eval_start=4", "train.eval_last=2", "train.eval_episodes=3",
            "train.eval_samplers=[ddim:2,ddpm-10]", "train.checkpoint_every=100"]
    assert _cli(*args, "--steps", "6") == 0
    assert calls == [("ddim", 2, 3), ("ddpm", 10, 3)] * 2  # steps 4 and 6, not 2 (before eval_start)
    assert _cli("--out", str(run), "--resume", "--steps", "8", "--no-progress", "--json", str(tmp_path / "s.json")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((run / "train_summary.json").read_text())
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    assert [e["step"] for e in summary["evaluations"]] == [4, 6, 8]  # the one before --resume is kept
    p = summary["protocol"]
    assert (p["last"], p["evaluated"], p["counted"], p["complete"], p["episodes"]) == (2, 3, 2, True, 3)
    ddim, ddpm = p["samplers"]["ddim-2"], p["samplers"]["ddpm-10"]
    assert ddim["steps"] == ddpm["steps"] == [6, 8]
    assert ddim["scores"] == pytest.approx([0.3, 0.5]) and ddpm["scores"] == pytest.approx([0.4, 0.6])
    assert (ddim["max"], ddim["mean"]) == pytest.approx((0.5, 0.4))
    assert (ddpm["success_rate_max"], ddpm["success_rate_mean"]) == pytest.approx((0.06, 0.05))
    assert out[-2] == "ddim-2: score max 0.500 mean 0.400; success max 0.05 mean 0.04 (last 2 of 3 evaluations x 3 episodes)"
    assert out[-1].startswith("ddpm-10: score max 0.600 mean 0.500")
    assert summary["best_score"] == pytest.approx(0.5)  # the first sampler picks checkpoints/best
    assert ckpt_io.read_state(run / "checkpoints" / "best")["step"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["score/ddpm-10"] for r in records if "score/ddpm-10" in r] == pytest.approx([0.2, 0.4, 0.6])


def test_protocol_summary_edge_cases():
    from dpkit.train.trainer import format_protocol, protocol_summary

    assert protocol_summary([], 10) is None and format_protocol(None) == []
    evals = [{"step": s, "samplers": {"default": {"score": s / 10, "success_rate": None}}} for s in (1, 2, 3)]
    p = protocol_summary(evals, 10)
    assert (p["counted"], p["complete"], p["samplers"]["default"]["mean"]) == (3, False, pytest.approx(0.2))
    assert p["samplers"]["default"]["success_rate_mean"] is None
    assert "fewer than train.eval_last=10" in format_protocol(p)[0] and "success" not in format_protocol(p)[0]


def test_ema_warmup_and_epoch_batches():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, power=0.75, max_decay=0.9999)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # first update copies
    torch.testing.assert_close(ema.module.weight, lin.weight)
    assert ema.decay() == pytest.approx(1 - 2**-0.75)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)
    d = 1 - 2**-0.75
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), d * 1.0 + (1 - d) * 3.0))
    ema.updates = 10**9
    assert ema.decay() == 0.9999

    ranks = [EpochBatches(50, 4, r, 2, seed=7) for r in (0, 1)]
    its = [iter(s) for s in ranks]
    epoch0 = [np.concatenate([next(its[0]), next(its[1])]) for _ in range(6)]  # 50 // 8 = 6 batches
    flat = np.concatenate(epoch0)
    assert len(set(flat)) == 48  # ranks take disjoint windows; the 2 left over are dropped
    later = iter(EpochBatches(50, 4, 1, 2, seed=7, start=7))
    np.testing.assert_array_equal(next(later), [next(its[1]) for _ in range(2)][1])  # resumes mid-epoch 1
    with pytest.raises(DpkitError, match="fewer than one batch"):
        EpochBatches(5, 4, 0, 2, seed=0)


def test_two_process_cpu_run(store, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dpkit.train.cli", "--config", "tiny", "--data", str(store), "--out", str(run), "--steps", "3",
           "--no-progress", "--json", str(tmp_path / "s.json"), *SMALL, "train.checkpoint_every=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert " x2;" in out and out.count("trained 3 steps") == 1  # rank 0 alone reports
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert [p.name for p in ckpt_io.step_dirs(run)] == ["step_000002", "step_000003"]
    assert ckpt_io.read_state(run / "checkpoints" / "step_000003")["world_size"] == 2
    assert sorted(_losses(run)) == [1, 2, 3]  # one line per step: written once, not by both ranks
    # Rank 0 draws what a 1-process run draws (same shard of global batch 0, same noise seed); rank 1
    # trains on other windows; the logged loss is their mean.
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    single = train(_cfg(store, "train.steps=1"), tmp_path / "single", progress=False)
    assert first["rank_losses"][0] == pytest.approx(single["final_loss"], abs=1e-6)
    assert abs(first["rank_losses"][1] - first["rank_losses"][0]) > 1e-4
    assert first["loss"] == pytest.approx(np.mean(first["rank_losses"]), abs=1e-6)


def test_a_config_starts_from_its_base_and_overrides_win(tmp_path):
    """`base:` layers a config on another (named, or a path from the file's folder); key=value overrides last."""
    (tmp_path / "mid.yaml").write_text("base: tiny\ntrain:\n  lr: 2.0e-4\n  batch_size: 8\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ntrain:\n  batch_size: 4\n")
    tiny = load_config("tiny")
    cfg = load_config(str(tmp_path / "top.yaml"), ["train.steps=7"])
    assert cfg.name == "top"
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.steps) == (2.0e-4, 4, 7)
    assert cfg.policy == tiny.policy and cfg.data == tiny.data
    assert dataclasses.replace(cfg.train, lr=tiny.train.lr, batch_size=tiny.train.batch_size,
                               steps=tiny.train.steps) == tiny.train


@pytest.mark.parametrize("text, message", [
    ("base: top.yaml\n", r"bases form a loop \(top -> top\)"),
    ("base: no_such_config\n", "config 'no_such_config' not found"),
    ("base: [tiny]\n", "base must name a config"),
    ("- base\n- tiny\n", "top level must be a mapping"),
])
def test_a_bad_base_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "top.yaml").write_text(text)
    with pytest.raises(DpkitError, match=message):
        load_config(str(tmp_path / "top.yaml"))
