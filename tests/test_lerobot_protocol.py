"""dpkit-eval --protocol lerobot (dpkit.eval.lerobot_protocol): lerobot-eval's seeds, batches, mask and metric
names, without lerobot installed. The identity check against lerobot's own code is
tests/lerobot_protocol_check.py; its committed output tests/data/lerobot_protocol_check.json is read here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dpkit.errors import DpkitError
from dpkit.eval import evaluate, lerobot_protocol, pusht
from dpkit.eval.evaluate import RandomPolicy
from dpkit.eval.lerobot_protocol import aggregate, batch_seeds, episode_metrics, evaluate_lerobot

CHECK = Path(__file__).resolve().parent / "data" / "lerobot_protocol_check.json"


def test_defaults_are_lerobot_evals():
    # lerobot 0.6.1: EvalPipelineConfig.seed 1000, EvalConfig.n_episodes 50, PushtEnv.episode_length 300.
    assert (lerobot_protocol.SEED, lerobot_protocol.N_EPISODES, lerobot_protocol.EPISODE_LENGTH) == (1000, 50, 300)
    assert lerobot_protocol.AGGREGATED == ("avg_sum_reward", "avg_max_reward", "pc_success", "n_episodes", "eval_s",
                                           "eval_ep_s")
    assert lerobot_protocol.PER_EPISODE == ("episode_ix", "sum_reward", "max_reward", "success", "seed")


def test_batch_seeds_follow_the_batch_index():
    assert batch_seeds(50, 50) == [list(range(1000, 1050))]
    assert batch_seeds(50, 10, 1000)[1] == list(range(1010, 1020)) and len(batch_seeds(50, 10)) == 5
    # 5 episodes in batches of 3: the last batch still runs 3 envs (seed 1066's episode is dropped).
    assert batch_seeds(5, 3, 1061) == [[1061, 1062, 1063], [1064, 1065, 1066]]
    assert batch_seeds(1, 1, 7) == [[7]]
    with pytest.raises(DpkitError, match="must be >= 1"):
        batch_seeds(0, 3)


def test_episode_metrics_keep_one_step_after_done():
    # (T=4, B=3): env 0 succeeds at step 1, so step 2 (the next episode's first, reward 0.5) still counts;
    # env 1 is never done before the last step; env 2 ends at the last step (nothing after it).
    rewards = np.array([[0.2, 0.1, 0.0], [1.0, 0.3, 0.0], [0.5, 0.2, 0.0], [0.9, 0.4, 0.7]])
    success = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=bool)
    done = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=bool)
    m = episode_metrics(rewards, success, done)
    assert m[0]["sum_reward"] == pytest.approx(0.2 + 1.0 + 0.5) and m[0]["max_reward"] == 1.0
    assert m[0]["success"] and m[0]["done_step"] == 1
    assert m[1]["sum_reward"] == pytest.approx(1.0) and m[1]["max_reward"] == 0.4 and not m[1]["success"]
    assert m[2]["sum_reward"] == pytest.approx(0.7) and m[2]["done_step"] == 3
    # A success only inside the masked tail (after done + 1) does not count.
    late = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=bool)
    assert not episode_metrics(rewards, late, done)[0]["success"]
    with pytest.raises(DpkitError, match=r"\(T, B\)"):
        episode_metrics(rewards, success[:2], done)


def test_aggregate_names_and_percent():
    rows = [{"sum_reward": 3.0, "max_reward": 1.0, "success": True}, {"sum_reward": 1.0, "max_reward": 0.5,
                                                                         "success": False}]
    o = aggregate(rows, eval_s=4.0)
    assert tuple(o) == lerobot_protocol.AGGREGATED
    assert (o["avg_sum_reward"], o["avg_max_reward"], o["pc_success"], o["n_episodes"]) == (2.0, 0.75, 50.0, 2)
    assert (o["eval_s"], o["eval_ep_s"]) == (4.0, 2.0)
    with pytest.raises(DpkitError, match="no episodes"):
        aggregate([], 1.0)


def test_rollout_starts_from_gym_pusht_reset_seed():
    r = evaluate_lerobot(RandomPolicy(), episodes=3, n_envs=2, max_steps=10, progress=False)
    assert r["protocol"] == "lerobot" and tuple(r["overall"]) == lerobot_protocol.AGGREGATED
    assert r["overall"]["n_episodes"] == 3 and r["n_envs"] == 2 and r["seed_start"] == 1000
    rows = r["per_episode"]
    assert [e["seed"] for e in rows] == [1000, 1001, 1002] and [e["episode_ix"] for e in rows] == [0, 1, 2]
    assert all(set(lerobot_protocol.PER_EPISODE) <= set(e) for e in rows)
    env = pusht.make_env("lowdim")
    try:
        for e in rows:
            env.reset(seed=e["seed"])
            assert e["start_state"] == pusht.env_state(env).tolist()
            assert not np.allclose(e["start_state"], pusht.legacy_start_state(e["seed"]))
    finally:
        env.close()
    # 2 batches (the second runs 2 envs, 1 episode kept) of 10 steps, a chunk every Ta = 8 steps.
    assert r["n_chunks"] == 4
    assert r["overall"]["avg_max_reward"] == pytest.approx(np.mean([e["max_reward"] for e in rows]))
    again = evaluate_lerobot(RandomPolicy(), episodes=3, n_envs=2, max_steps=10, progress=False)
    assert [e["sum_reward"] for e in again["per_episode"]] == [e["sum_reward"] for e in rows]


def test_identity_check_against_lerobot_recorded():
    """tests/lerobot_protocol_check.py's committed output: lerobot 0.6.1's eval_policy_all vs dpkit."""
    check = json.loads(CHECK.read_text())
    assert check["versions"]["lerobot_side"]["lerobot"] == "0.6.1"
    assert set(check["cases"]) == {"default", "threshold"}
    for case in check["cases"].values():
        assert case["all_start_states_equal"] and case["all_success_equal"] and case["noise_identical"]
        assert case["same_metric_names"]
        assert case["max_sum_reward_abs_diff"] < 1e-5 and case["max_max_reward_abs_diff"] < 1e-6
        assert all(v < 1e-5 for v in case["overall_abs_diff"].values())
    # The threshold case ends episodes early: lerobot's extra masked step is in its sum_reward.
    assert check["cases"]["threshold"]["episodes_with_nonzero_extra_step_reward"] > 0


def _run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_protocol_lerobot(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, _ = _run_cli(["--random", "--protocol", "lerobot", "--episodes", "2", "--max-steps", "4",
                                "--quiet", "--json", str(out)], capsys)
    assert code == 0
    r = json.loads(out.read_text())
    assert r["protocol"] == "lerobot" and r["seed_start"] == 1000 and len(r["per_episode"]) == 2
    assert "avg_max_reward" in stdout and "pc_success" in stdout


@pytest.mark.parametrize("extra, message", [
    (["--video-dir", "{tmp}/v"], "--protocol lerobot writes no videos"),
    (["--latency-steps", "2"], "--protocol lerobot takes no --latency-steps"),
])
def test_cli_protocol_lerobot_bad_input_is_one_line(tmp_path, capsys, extra, message):
    args = ["--random", "--protocol", "lerobot"] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, _, stderr = _run_cli(args, capsys)
    assert code != 0 and message in stderr
    assert stderr.startswith("error: ") and stderr.strip().count("\n") == 0


def test_cli_unknown_protocol_is_one_line(capsys):
    code, _, stderr = _run_cli(["--random", "--protocol", "gym"], capsys)
    assert code != 0 and "--protocol" in stderr and stderr.strip().count("\n") == 0
