"""Bad input on the evaluation and runtime side gets one clear line (or one clear exception), never a traceback.

Evaluation options that would be accepted and ignored, a policy for another task under latency, and the
two real-time controllers (the Python reference and the C++ one) checking the same things the same way.
"""

from __future__ import annotations

import pytest

from dpkit.errors import DpkitError

gym_pusht = pytest.importorskip("gym_pusht")

from dpkit.eval import evaluate  # noqa: E402
from dpkit.eval.latency import evaluate_latency  # noqa: E402


def _eval_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def _one_line(err: str, fragment: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err


class OtherTask:
    """A policy for another robot: PushT cannot give its observation."""

    backend = "fake"
    obs_mode = "lowdim"
    obs_keys = ("joint_pos",)
    n_obs_steps = 2
    n_action_steps = 8

    def predict_action(self, obs, sampler=None, steps=None, *, seed=None):
        raise AssertionError("never reached")


@pytest.mark.parametrize("latency", [0, 2])
def test_a_policy_for_another_task_is_refused_by_name_under_latency(latency):
    # once a KeyError traceback from eval/latency.py (without latency it was refused by name)
    with pytest.raises(DpkitError, match="'joint_pos' is not one of"):
        evaluate_latency(OtherTask(), latency, "async", episodes=1, max_steps=5, progress=False)


@pytest.mark.parametrize("args,message", [
    (["--blend", "3", "--latency-steps", "2", "--execution", "sync"], "--blend 3 would be ignored: it applies only"),
    (["--blend", "3", "--latency-steps", "2", "--execution", "async"], "not to --execution async"),
    (["--blend", "3"], "not to an evaluation without --latency-steps"),
    (["--blend", "3", "--execution", "async-inpaint"], "needs --latency-steps >= 1, got 0"),
    (["--blend", "3", "--latency-steps", "0"], "needs --latency-steps >= 1, got 0"),
])
def test_eval_blend_that_would_be_ignored_is_refused(tmp_path, capsys, args, message):
    # The check runs before the bundle loads, so a folder that only looks like a bundle is enough.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "policy.json").write_text("{}")
    rc, err = _eval_cli(capsys, "--bundle", tmp_path / "b", "--quiet", "--json", tmp_path / "r.json", *args)
    assert rc == 1
    _one_line(err, message)
    assert not (tmp_path / "r.json").exists()


def test_evaluate_latency_refuses_an_ignored_blend():
    with pytest.raises(DpkitError, match="blend 2 would be ignored"):
        evaluate_latency(OtherTask(), 2, "sync", blend=2, episodes=1, max_steps=5, progress=False)
