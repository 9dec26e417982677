"""dpkit-eval under simulated inference latency (eval/latency.py) on an exported tiny bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from dpkit.eval import evaluate  # noqa: E402
from dpkit.eval.latency import evaluate_latency  # noqa: E402
from dpkit.runtime import load_policy  # noqa: E402


@pytest.fixture(scope="module")
def policy(tiny_bundles):
    return load_policy(tiny_bundles["lowdim"], backend="ort", threads=1)


def test_zero_delay_is_the_same_run_in_every_mode(policy):
    reports = {m: evaluate_latency(policy, 0, m, episodes=2, max_steps=24, progress=False, steps=2)
               for m in ("sync", "async", "async-inpaint")}
    scores = {m: [e["max_reward"] for e in r["episodes"]] for m, r in reports.items()}
    assert scores["sync"] == scores["async"] == scores["async-inpaint"]
    for r in reports.values():
        assert r["deadline_misses"] == 0 and r["wait_ticks"] == 0 and r["latency_steps"] == 0
        assert r["sampler"] == "ddim-2" and len(r["episodes"]) == 2


def test_delay_makes_sync_hold_and_async_switch_late(policy):
    sync = evaluate_latency(policy, 3, "sync", episodes=2, max_steps=40, progress=False, steps=2)
    asy = evaluate_latency(policy, 3, "async-inpaint", episodes=2, max_steps=40, progress=False, steps=2, blend=2)
    assert sync["wait_ticks"] > 0 and sync["deadline_misses"] == 0
    assert asy["wait_ticks"] == 0 and asy["deadline_misses"] == 0
    assert asy["blend"] == 2 and asy["mean_jump_at_switch_px"] is not None and asy["mean_jump_inside_px"] is not None
    # reproducible: same seeds, same noise
    again = evaluate_latency(policy, 3, "async-inpaint", episodes=2, max_steps=40, progress=False, steps=2, blend=2)
    assert [e["max_reward"] for e in again["episodes"]] == [e["max_reward"] for e in asy["episodes"]]


def test_cli_latency_flags(tiny_bundles, tmp_path, capsys):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--bundle", str(tiny_bundles["lowdim"]), "--backend", "ort", "--episodes", "1", "--max-steps",
                       "12", "--steps", "2", "--latency-steps", "2", "--execution", "async", "--json", str(out),
                       "--quiet"])
    assert e.value.code == 0
    report = json.loads(out.read_text())
    assert report["execution"] == "async" and report["latency_steps"] == 2
    assert "deadline misses" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--latency-steps", "-1"], "--latency-steps must be >= 0"),
    (["--execution", "later"], "invalid choice"),
    (["--latency-steps", "1", "--video-dir", "v"], "--video-dir is not available"),
    (["--blend", "-1"], "--blend must be >= 0"),
])
def test_cli_bad_latency_flags(tiny_bundles, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--bundle", str(tiny_bundles["lowdim"]), "--backend", "ort", "--quiet", *args])
    assert e.value.code != 0
    assert message in capsys.readouterr().err


def test_delay_larger_than_the_chunk_is_refused(policy):
    from dpkit.errors import DpkitError

    with pytest.raises(DpkitError, match="delay must be an integer in"):
        evaluate_latency(policy, policy.n_action_steps + 1, "async", episodes=1, max_steps=5, progress=False)
