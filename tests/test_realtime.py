"""The real-time controller's schedule on a virtual clock, with a policy whose trajectory rows carry their time.

The fake policy reads the tick from the newest observation and returns a trajectory whose row r holds the
absolute tick that row is for (tick - first_action_index + r). An async controller that switches each new
chunk in at the right index therefore outputs, at tick n, the action value n — exactly.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dpkit.errors import DpkitError
from dpkit.runtime.backend import PolicyBackend, PolicySpec, SamplerChoice
from dpkit.runtime.realtime import RealTimeController


class TimePolicy(PolicyBackend):
    backend = "fake"

    def __init__(self, fail_after: int | None = None, delay_s: float = 0.0):
        super().__init__(PolicySpec("lowdim", 2, 16, 8, 2, 1, ({"name": "obs", "shape": [1], "dtype": "float32"},),
                                    np.ones(2), np.zeros(2)))
        self.calls: list[dict] = []
        self.fail_after = fail_after
        self.delay_s = delay_s

    def _find(self, sampler, steps):
        return SamplerChoice("ddim-10", "ddim", 10, False)

    def _run(self, arrays, batch, choice, initial_noise, step_noise, inpaint):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("the accelerator fell over")
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        tick = arrays["obs"][:, -1, 0]  # newest observation
        rows = np.arange(self.horizon, dtype=np.float32) - self.spec.first_action_index
        traj = np.repeat((tick[:, None] + rows[None, :])[:, :, None], 2, axis=2).astype(np.float32)
        self.calls.append({"tick": tick.copy(), "prefix": None if inpaint is None else inpaint.values.copy(),
                           "weights": None if inpaint is None else inpaint.weights.copy()})
        return traj


def _run(ctl, ticks, batch=2):
    out = []
    for n in range(ticks):
        out.append(ctl.step({"obs": np.full((batch, 1), float(n), np.float32)})[:, 0].copy())
    return np.array(out)


@pytest.mark.parametrize("execution", ["async", "async-inpaint"])
@pytest.mark.parametrize("d", [0, 1, 2, 3, 4])
def test_async_switches_in_at_the_elapsed_index(execution, d):
    with RealTimeController(TimePolicy(), execution=execution, delay=d) as ctl:
        actions = _run(ctl, 40)
    np.testing.assert_array_equal(actions[:, 0], np.arange(40))  # every tick executes its own action
    assert ctl.stats.deadline_misses == 0 and ctl.stats.wait_ticks == 0
    assert ctl.stats.chunks == len(ctl.policy.calls)


def test_inpaint_prefix_is_what_executes_meanwhile():
    d, blend = 2, 3
    policy = TimePolicy()
    with RealTimeController(policy, execution="async-inpaint", delay=d, blend=blend) as ctl:
        _run(ctl, 30)
    for call in policy.calls[1:]:
        n = call["tick"][0]
        # rows for ticks n .. n+d-1 (weight 1) then n+d .. n+d+blend-1 (decaying), from the old trajectory
        np.testing.assert_array_equal(call["prefix"][0, :, 0], n + np.arange(d + blend))
        np.testing.assert_allclose(call["weights"], [1, 1, 0.75, 0.5, 0.25])
    assert policy.calls[0]["prefix"] is None  # the first chunk has nothing to continue


def test_sync_holds_while_waiting_and_runs_stale_chunks():
    d = 2
    with RealTimeController(TimePolicy(), execution="sync", delay=d) as ctl:
        actions = _run(ctl, 30)[:, 0]
    # chunk 0 (ticks 0-7), hold 2, chunk from tick 8 executes from its first action at tick 10 ...
    np.testing.assert_array_equal(actions[:8], np.arange(8))
    np.testing.assert_array_equal(actions[8:10], [7, 7])
    np.testing.assert_array_equal(actions[10:18], np.arange(8, 16))
    assert ctl.stats.wait_ticks == d * (ctl.stats.requests - 1)  # every request after the first waits d
    assert ctl.stats.deadline_misses == 0


def test_a_delay_beyond_half_the_chunk_misses_deadlines():
    with RealTimeController(TimePolicy(), execution="async", delay=6) as ctl:
        actions = _run(ctl, 40)[:, 0]
    assert ctl.stats.deadline_misses > 0
    assert np.all(np.diff(actions) >= 0)  # holds, never goes back in time


def test_worker_failure_reaches_the_caller_and_close_is_clean():
    ctl = RealTimeController(TimePolicy(fail_after=1), execution="async", delay=2)
    with pytest.raises(DpkitError, match="sampling a chunk failed: RuntimeError: the accelerator fell over"):
        _run(ctl, 20)
    ctl.close()
    with pytest.raises(DpkitError, match="closed"):
        ctl.step({"obs": np.zeros((2, 1), np.float32)})


def test_wall_clock_mode_estimates_the_delay():
    policy = TimePolicy(delay_s=0.02)
    with RealTimeController(policy, execution="async", delay=None, period=0.01) as ctl:
        for n in range(30):
            ctl.step({"obs": np.full((1, 1), float(n), np.float32)})
            threading.Event().wait(0.01)
        assert 1 <= ctl.expected_delay() <= 8
        assert ctl.stats.chunks >= 2


@pytest.mark.parametrize("kwargs, message", [
    ({"execution": "later"}, "execution must be one of"),
    ({"delay": -1}, "delay must be an integer in"),
    ({"delay": 9}, "delay must be an integer in"),
    ({"delay": 2.5}, "delay must be an integer in"),
    ({"margin": -1}, "margin must be"),
    ({"blend": -2}, "blend must be"),
    ({"period": 0}, "period must be"),
    ({"seed": -3}, "seed must be"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(DpkitError, match=message):
        RealTimeController(TimePolicy(), **kwargs)


def test_bad_observations_are_clear_errors():
    with RealTimeController(TimePolicy(), delay=1) as ctl:
        with pytest.raises(DpkitError, match="do not match"):
            ctl.step({"image": np.zeros((1, 1))})
        with pytest.raises(DpkitError, match="do not match"):
            ctl.step([np.zeros((1, 1))])
