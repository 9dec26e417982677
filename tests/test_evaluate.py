"""Vectorized rollout evaluation (`evaluate_policy`) and the `dpkit-eval` CLI, with small fake policies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from dpkit.errors import DpkitError  # noqa: E402
from dpkit.eval import evaluate, pusht  # noqa: E402
from dpkit.eval.evaluate import RandomPolicy, evaluate_policy  # noqa: E402


class TowardBlock:
    """Deterministic low-dim policy: aim past the block's keypoint centroid; records what it is given."""

    backend = "fake"
    obs_mode = "lowdim"
    obs_keys = ("obs",)

    def __init__(self, n_obs_steps=2, n_action_steps=8):
        self.n_obs_steps, self.n_action_steps = n_obs_steps, n_action_steps
        self.calls = []

    def predict_action(self, obs, sampler=None, steps=None, *, seed=None):
        x = obs["obs"]
        self.calls.append(x.copy())
        kp = x[:, -1, :18].reshape(-1, 9, 2).mean(axis=1)
        agent = x[:, -1, 18:]
        target = agent + 1.5 * (kp - agent)
        return np.repeat(target[:, None, :], self.n_action_steps, axis=1)


class ImageProbe:
    """Image policy that checks its inputs and stays put at its current position."""

    backend = "probe"
    obs_mode = "image"
    obs_keys = ("image", "agent_pos")
    n_obs_steps = 2
    n_action_steps = 4

    def __init__(self):
        self.batches = []

    def predict_action(self, obs, sampler=None, steps=None, *, seed=None):
        img, pos = obs["image"], obs["agent_pos"]
        b = len(img)
        assert img.shape == (b, 2, 3, 96, 96) and img.dtype == np.float32
        assert pos.shape == (b, 2, 2) and pos.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        self.batches.append(b)
        return np.repeat(pos[:, -1:, :], self.n_action_steps, axis=1).astype(np.float64)


def test_report_structure_and_batched_calls():
    policy = TowardBlock()
    r = evaluate_policy(policy, episodes=3, max_steps=20, progress=False)
    for key in ("score", "success_rate", "backend", "mean_chunk_latency_ms", "episodes", "n_episodes", "max_steps", "wall_s"):
        assert key in r, key
    json.dumps(r)  # serializable as is
    assert r["backend"] == "fake" and r["n_episodes"] == 3 and r["max_steps"] == 20 and r["n_envs"] == 3
    assert [e["seed"] for e in r["episodes"]] == [100000, 100001, 100002]
    assert all(1 <= e["steps"] <= 20 and 0.0 <= e["max_reward"] <= 1.0 for e in r["episodes"])
    assert r["score"] == pytest.approx(np.mean([e["max_reward"] for e in r["episodes"]]))
    assert r["success_rate"] == pytest.approx(np.mean([e["success"] for e in r["episodes"]]))
    assert r["mean_chunk_latency_ms"] > 0
    # One call per chunk for the whole batch: ceil(20 / 8) chunks of batch 3.
    assert len(policy.calls) == math.ceil(20 / 8) == r["n_chunks"]
    first = policy.calls[0]
    assert first.shape == (3, 2, 20) and first.dtype == np.float32
    # At reset the history is the first observation repeated.
    np.testing.assert_array_equal(first[:, 0], first[:, 1])
    for j, seed in enumerate((100000, 100001, 100002)):
        s = pusht.legacy_start_state(seed)
        np.testing.assert_allclose(first[j, 0, 18:], s[:2])
    # Later chunks see two different, consecutive observations.
    assert not np.array_equal(policy.calls[1][:, 0], policy.calls[1][:, 1])


def test_same_seeds_give_the_same_result_whatever_the_batching():
    a = evaluate_policy(TowardBlock(), episodes=3, max_steps=24, progress=False)
    b = evaluate_policy(TowardBlock(), episodes=3, max_steps=24, progress=False)
    c = evaluate_policy(TowardBlock(), episodes=3, max_steps=24, n_envs=2, progress=False)
    assert a["episodes"] == b["episodes"] == c["episodes"]
    assert c["n_envs"] == 2
    # The fake pushes the block: it must do better than standing still on some episode.
    assert any(e["max_reward"] > 0.0 for e in a["episodes"])


def test_random_policy_is_seeded():
    a = evaluate_policy(RandomPolicy(), episodes=2, max_steps=16, progress=False)
    b = evaluate_policy(RandomPolicy(), episodes=2, max_steps=16, progress=False)
    c = evaluate_policy(RandomPolicy(), episodes=2, max_steps=16, progress=False, sample_seed=7)
    assert a["episodes"] == b["episodes"]
    assert a["episodes"] != c["episodes"]
    # The physics does not depend on what is observed: the image env with the same actions agrees.
    d = evaluate_policy(RandomPolicy(obs_mode="image"), episodes=2, max_steps=16, progress=False)
    assert [e["max_reward"] for e in d["episodes"]] == [e["max_reward"] for e in a["episodes"]]


def test_image_mode_and_video(tmp_path):
    policy = ImageProbe()
    r = evaluate_policy(policy, episodes=2, max_steps=10, video_dir=tmp_path / "v", n_videos=1, progress=False)
    assert policy.batches == [2, 2, 2]  # ceil(10 / 4) chunks
    assert len(r["videos"]) == 1 and r["videos"][0].endswith("episode000_seed100000.gif")
    import imageio.v3 as iio

    frames = iio.imread(r["videos"][0], index=None)
    assert frames.shape[0] == r["episodes"][0]["steps"] + 1 and frames.shape[-1] == 3
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["episode000_seed100000.gif"]


def test_bad_policies_are_rejected():
    class WrongKeys(TowardBlock):
        obs_keys = ("image", "agent_pos")

    with pytest.raises(DpkitError, match="do not match"):
        evaluate_policy(WrongKeys(), episodes=1, max_steps=5, progress=False)

    class WrongShape(TowardBlock):
        def predict_action(self, obs, sampler=None, steps=None, *, seed=None):
            return np.zeros((len(obs["obs"]), 3))

    with pytest.raises(DpkitError, match="shape"):
        evaluate_policy(WrongShape(), episodes=1, max_steps=5, progress=False)

    class NaNs(TowardBlock):
        def predict_action(self, obs, sampler=None, steps=None, *, seed=None):
            return np.full((len(obs["obs"]), self.n_action_steps, 2), np.nan)

    with pytest.raises(DpkitError, match="non-finite"):
        evaluate_policy(NaNs(), episodes=1, max_steps=5, progress=False)
    with pytest.raises(DpkitError, match="episodes"):
        evaluate_policy(TowardBlock(), episodes=0, progress=False)


def test_sampling_options_and_seeds_reach_the_policy():
    class Recorder(TowardBlock):
        def predict_action(self, obs, sampler=None, steps=None, *, seed=None):
            self.options = getattr(self, "options", []) + [{"sampler": sampler, "steps": steps, "seed": seed}]
            return super().predict_action(obs)

    a, b = Recorder(), Recorder()
    r = evaluate_policy(a, episodes=2, max_steps=16, sampler="ddim", steps=3, progress=False)
    evaluate_policy(b, episodes=2, max_steps=16, sampler="ddim", steps=3, progress=False)
    assert r["sampler"] == "ddim" and r["steps"] == 3
    assert [o["sampler"] for o in a.options] == ["ddim", "ddim"] and all(o["steps"] == 3 for o in a.options)
    seeds = [o["seed"] for o in a.options]
    assert len(set(seeds)) == 2  # fresh noise each chunk...
    assert seeds == [o["seed"] for o in b.options]  # ...and the same on a rerun


def _run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_writes_the_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, _ = _run_cli(["--random", "--episodes", "2", "--max-steps", "8", "--quiet", "--json", str(out)], capsys)
    assert code == 0
    r = json.loads(out.read_text())
    assert r["backend"] == "random" and len(r["episodes"]) == 2
    assert "score" in stdout and "success rate" in stdout


def test_cli_sample_seed_draws_fresh_noise_on_the_same_start_states(tmp_path, capsys, monkeypatch):
    """--sample-seed N: the chunks' noise seeds come from N (recorded in the report); the same N repeats them."""
    seen: list[int] = []
    draw = evaluate.RandomPolicy.predict_action

    def recording(self, obs, sampler=None, steps=None, *, seed=None):
        seen.append(seed)
        return draw(self, obs, sampler, steps, seed=seed)

    monkeypatch.setattr(evaluate.RandomPolicy, "predict_action", recording)
    runs = {}
    for n in (0, 5, 5):
        out = tmp_path / f"r{n}.json"
        seen.clear()
        code, _, _ = _run_cli(["--random", "--episodes", "2", "--max-steps", "16", "--quiet", "--sample-seed", str(n),
                               "--json", str(out)], capsys)
        assert code == 0
        report = json.loads(out.read_text())
        assert report["sample_seed"] == n and report["seed_start"] == 100000
        runs.setdefault(n, []).append(list(seen))
    assert runs[5][0] == runs[5][1] and runs[5][0] != runs[0][0] and len(runs[0][0]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--random", "--episodes", "0"], "--episodes must be >= 1"),
        (["--random", "--sample-seed", "-1"], "--sample-seed must be >= 0"),
        (["--random", "--max-steps", "0"], "--max-steps"),
        (["--random", "--backend", "ort"], "--random takes no"),
        (["--bundle", "{tmp}/bundle", "--backend", "tensorrt"], "unknown backend"),
        (["--bundle", "{tmp}/nothing"], "policy.json is missing"),
        (["--bundle", "{tmp}/bundle", "--backend", "torch"], "a bundle runs with"),
        (["--checkpoint", "{tmp}/missing.safetensors"], "does not exist"),
        (["--checkpoint", "{tmp}/bundle", "--backend", "cpp"], "a checkpoint runs with"),
        (["--random", "--json", "{tmp}/afile/r.json"], "cannot create output folder"),
        (["--random", "--json", "{tmp}"], "is a folder"),
        (["--random", "--sampler", "euler"], "unknown --sampler"),
        (["--episodes", "3"], "one of the arguments"),
        (["--random", "--bogus"], "unrecognized"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "policy.json").write_text("{}")
    (tmp_path / "afile").write_text("")
    code, stdout, stderr = _run_cli([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
    assert code != 0
    assert message in stderr
    assert stderr.startswith("error: ") and stderr.strip().count("\n") == 0


def test_cli_failure_keeps_an_earlier_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    out.write_text('{"score": 0.5}\n')

    class Breaks(TowardBlock):
        def predict_action(self, obs, sampler=None, steps=None, *, seed=None):
            if len(self.calls) == 1:
                raise DpkitError("sampler failed")
            return super().predict_action(obs)

    monkeypatch.setattr(evaluate, "_load", lambda args: Breaks())
    videos = tmp_path / "videos"
    # One env: episode 0 finishes (its video is ready) before the second call fails.
    args = ["--random", "--episodes", "2", "--n-envs", "1", "--max-steps", "8", "--quiet", "--json", str(out)]
    code, _, stderr = _run_cli(args + ["--video-dir", str(videos)], capsys)
    assert code != 0 and "sampler failed" in stderr
    assert out.read_text() == '{"score": 0.5}\n'
    assert not videos.exists() or list(videos.iterdir()) == []  # no video of a failed run


class StandStill(TowardBlock):
    def predict_action(self, obs, sampler=None, steps=None, *, seed=None):
        self.calls.append(obs["obs"].copy())
        return np.repeat(obs["obs"][:, -1:, 18:], self.n_action_steps, axis=1).astype(np.float64)


def test_a_successful_episode_stops_and_leaves_the_batch(monkeypatch):
    legacy = pusht.reset_legacy

    def block_on_goal_for_second_seed(env, seed):
        if seed == 100001:
            return pusht.restore_state(env, [50, 50, *pusht.GOAL_POSE])
        return legacy(env, seed)

    monkeypatch.setattr(pusht, "reset_legacy", block_on_goal_for_second_seed)
    policy = StandStill()
    r = evaluate_policy(policy, episodes=2, max_steps=20, progress=False)
    first, second = r["episodes"]
    assert second == {"seed": 100001, "max_reward": 1.0, "steps": 1, "success": True}
    assert first["steps"] == 20 and not first["success"]
    assert r["success_rate"] == 0.5
    assert [len(c) for c in policy.calls] == [2, 1, 1]
