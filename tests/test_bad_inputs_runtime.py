"""Bad input on the evaluation and runtime side gets one clear line (or one clear exception), never a traceback.

Evaluation options that would be accepted and ignored, a policy for another task under latency, and the
two real-time controllers (the Python reference and the C++ one) checking the same things the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dpkit.errors import DpkitError
from dpkit.runtime.realtime import CppRealTimeController, RealTimeController


@pytest.fixture(scope="module")
def evaluate():
    pytest.importorskip("gym_pusht")
    from dpkit.eval import evaluate

    return evaluate


@pytest.fixture(scope="module")
def evaluate_latency():
    pytest.importorskip("gym_pusht")
    from dpkit.eval.latency import evaluate_latency

    return evaluate_latency


def _eval_cli(evaluate, capsys, *argv) -> tuple[int, str]:
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
def test_a_policy_for_another_task_is_refused_by_name_under_latency(evaluate_latency, latency):
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
def test_eval_blend_that_would_be_ignored_is_refused(evaluate, tmp_path, capsys, args, message):
    # The check runs before the bundle loads, so a folder that only looks like a bundle is enough.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "policy.json").write_text("{}")
    rc, err = _eval_cli(evaluate, capsys, "--bundle", tmp_path / "b", "--quiet", "--json", tmp_path / "r.json", *args)
    assert rc == 1
    _one_line(err, message)
    assert not (tmp_path / "r.json").exists()


def test_evaluate_latency_refuses_an_ignored_blend(evaluate_latency):
    with pytest.raises(DpkitError, match="blend 2 would be ignored"):
        evaluate_latency(OtherTask(), 2, "sync", blend=2, episodes=1, max_steps=5, progress=False)


# ---- the two real-time controllers: one validation, one meaning of delay, integers checked before C++ -----

GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "bundle"


@pytest.fixture(scope="module")
def policies():
    """The golden bundle under the Python reference (ort) and the C++ controller (cpp)."""
    from dpkit.runtime import load_policy

    pytest.importorskip("dpkit.runtime._core")
    return load_policy(GOLDEN, backend="ort", threads=1), load_policy(GOLDEN, backend="cpp", threads=1, max_batch=2)


def _controllers(policies, **kwargs):
    ort, cpp = policies
    return [RealTimeController(ort, **kwargs), CppRealTimeController(cpp, **kwargs)]


GOOD = np.full((1, 20), 256, np.float32)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((1, 3), np.float32), "observation 'obs' has shape (1, 3), expected (1, 20)"),
    (np.full((2, 20), 256, np.float32), "observation 'obs' has shape (2, 20), expected (1, 20)"),  # batch fixed
    (np.zeros((1, 20), bool), "observation 'obs' must hold numbers, got dtype bool"),
    (np.zeros((1, 20), object), "observation 'obs' must hold numbers, got dtype object"),
    (GOOD.tolist(), "observation 'obs' must be a numpy array, got list"),
    (np.full((1, 20), np.nan, np.float32), "observation 'obs' holds NaN or Inf"),
])
def test_both_controllers_refuse_a_bad_observation_mid_stream_at_step(policies, bad, message):
    # once: the Python reference took it and failed later with a raw numpy error (or sampled from it)
    for ctl in _controllers(policies, delay=1):
        with ctl:
            ctl.step({"obs": GOOD})
            with pytest.raises(ValueError, match=re.escape(message)) as e:
                ctl.step({"obs": bad})
            assert isinstance(e.value, DpkitError)
            assert ctl.step({"obs": GOOD}).shape == (1, 2)  # refused before it touched the history


@pytest.mark.parametrize("kwargs,message", [
    ({"delay": -1}, "delay must be an integer in [0, 8] ticks (n_action_steps = 8; None: measured on the wall "
                    "clock), got -1"),
    ({"delay": 9}, "delay must be an integer in [0, 8] ticks"),
    ({"delay": 10**30}, "delay must be an integer in [0, 8] ticks"),
    ({"margin": 10**30}, "margin must be an integer in [0, 8] ticks"),
    ({"blend": 10**30}, "blend must be an integer in [0, 1000000] rows"),
    ({"period": True}, "period must be a positive number of seconds"),
])
def test_both_controllers_take_the_same_settings(policies, kwargs, message):
    # once: CppRealTimeController(delay=-1) quietly meant the wall clock, the reference refused -1
    for make, policy in zip((RealTimeController, CppRealTimeController), policies):
        with pytest.raises(ValueError, match=re.escape(message)):
            make(policy, **kwargs)
    for ctl in _controllers(policies, delay=None):  # None: the wall clock, in both
        with ctl:
            assert ctl.expected_delay() == 1


@pytest.mark.parametrize("call,message", [
    (lambda cpp, core: core.RealTimeController(cpp._policy, num_inference_steps=10**30),
     "num_inference_steps is out of range, got 1000000000000000000000000000000"),
    (lambda cpp, core: core.RealTimeController(cpp._policy, delay=10**30), "delay is out of range"),
    (lambda cpp, core: core.RealTimeController(cpp._policy, batch=-10**30), "batch is out of range"),
    (lambda cpp, core: cpp._policy.find_sampler("ddim", 10**30), "num_inference_steps is out of range"),
    (lambda cpp, core: cpp.predict_action({"obs": np.full((1, 2, 20), 256, np.float32)}, steps=10**30),
     "steps must be an integer in [1, 1000000], got 1000000000000000000000000000000"),
    (lambda cpp, core: cpp.resolve_sampler("ddpm", 2**31), "steps must be an integer in [1, 1000000]"),
    (lambda cpp, core: CppRealTimeController(cpp, batch=10**30), "batch must be an integer in [1, 2]"),
    (lambda cpp, core: CppRealTimeController(cpp, seed=2**64), "seed must be an integer in"),
    (lambda cpp, core: type(cpp)(GOLDEN, threads=1, max_batch=10**30),
     "max_batch must be an integer in [1, 2147483647]"),
    (lambda cpp, core: type(cpp)(GOLDEN, threads=1, seed=2**64), "seed must be an integer in [0, 9223372036854775807]"),
    (lambda cpp, core: type(cpp)(GOLDEN, threads=1, device_id=10**30), "device_id must be an integer in"),
    # the extension's own arguments, called directly (every integer is range-checked in the module)
    (lambda cpp, core: core.RealTimeController(cpp._policy, seed=10**30), "seed must be an integer in [0, 2**64 - 1]"),
    (lambda cpp, core: core.RealTimeController(cpp._policy, seed=-1), "seed must be an integer in [0, 2**64 - 1], got -1"),
    (lambda cpp, core: core.RealTimeController(cpp._policy, worker_priority=10**30), "worker_priority is out of range"),
    (lambda cpp, core: core.RealTimeController(cpp._policy, worker_cpus=[10**30]), "worker_cpus entry is out of range"),
    (lambda cpp, core: core.RealTimeController.request_seed(10**30, 1), "seed must be an integer in [0, 2**64 - 1]"),
    (lambda cpp, core: cpp._policy.reseed(2**64), "seed must be an integer in [0, 2**64 - 1], got 18446744073709551616"),
    (lambda cpp, core: core.Policy(str(GOLDEN), threads=10**30), "threads is out of range"),
    (lambda cpp, core: cpp._policy.sample({"obs": np.full((1, 2, 20), 256, np.float32)},
                                          cpp._policy.find_sampler("ddim", 10), prefix_start=10**30),
     "prefix_start is out of range"),
])
def test_huge_integers_are_refused_before_the_pybind_cast(policies, call, message):
    # once: pybind11's "Unable to cast Python instance of type <class 'int'> to C++ type 'long long'"
    from dpkit.runtime import _core

    with pytest.raises(ValueError, match=re.escape(message)) as e:
        call(policies[1], _core)
    assert isinstance(e.value, DpkitError) and "Unable to cast" not in str(e.value)
