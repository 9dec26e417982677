"""The C++ real-time controller (dpkit::RealTimeController through _core) against the Python reference.

With a fixed delay time is virtual, so both controllers are deterministic. Their noise generators differ
(the C++ one reseeds the policy's generator per chunk, the reference draws numpy noise from its seed), so
the reference runs over a policy that draws exactly the C++ controller's noise: the same CppPolicy code,
reseeded with `request_seed(seed, r)` before chunk r. Everything else — history, trigger, prefix rows and
weights, switch index, holds — is each controller's own, and the actions must agree tick by tick.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dpkit.errors import DpkitError

_core = pytest.importorskip("dpkit.runtime._core")

from dpkit.runtime import load_policy  # noqa: E402
from dpkit.runtime.realtime import CppRealTimeController, RealTimeController, make_controller  # noqa: E402

SEED = 11


@pytest.fixture(scope="module")
def cpp_policy(tiny_bundles):
    return load_policy(tiny_bundles["lowdim"], backend="cpp", threads=1, max_batch=2)


class CppNoise:
    """A CppPolicy whose chunk r draws the C++ controller's noise for request r."""

    def __init__(self, policy, seed):
        self._policy, self._seed, self.calls = policy, seed, 0

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def sample(self, obs, sampler=None, steps=None, *, seed=None, **kwargs):
        self._policy._policy.reseed(_core.RealTimeController.request_seed(self._seed, self.calls))
        self.calls += 1
        return self._policy.sample(obs, sampler, steps, **kwargs)  # no seed: the C++ generator draws


def _stream(policy, ticks, batch=2):
    rng = np.random.default_rng(5)
    (spec,) = policy.observations
    walk = np.cumsum(rng.normal(0, 8, (ticks, batch, *spec["shape"])), axis=0) + 256
    return [{spec["name"]: walk[n].astype(np.float32)} for n in range(ticks)]


def _drive(ctl, stream):
    actions, switched = [], []
    with ctl:
        for obs in stream:
            actions.append(ctl.step(obs))
            switched.append(ctl.switched)
        stats = ctl.stats
    return np.array(actions), switched, stats


@pytest.mark.parametrize("execution", ["sync", "async", "async-inpaint"])
@pytest.mark.parametrize("d", [0, 1, 2, 3])
def test_cpp_controller_matches_the_python_reference(cpp_policy, execution, d):
    stream = _stream(cpp_policy, 200)
    kwargs = dict(execution=execution, delay=d, blend=2 if execution == "async-inpaint" else 0, seed=SEED)
    cpp = make_controller(cpp_policy, **kwargs)
    assert isinstance(cpp, CppRealTimeController)
    got, got_switched, got_stats = _drive(cpp, stream)
    reference = CppNoise(cpp_policy, SEED)
    want, want_switched, want_stats = _drive(RealTimeController(reference, **kwargs), stream)
    np.testing.assert_array_equal(got, want)
    assert got_switched == want_switched
    for k in ("ticks", "requests", "chunks", "deadline_misses", "wait_ticks"):
        assert getattr(got_stats, k) == getattr(want_stats, k), k
    assert len(got_stats.latencies_s) == got_stats.chunks
    assert got_stats.chunks >= 200 // (cpp_policy.n_action_steps + d)
    if execution == "sync":
        assert got_stats.wait_ticks == d * (got_stats.requests - 1)
    else:
        assert got_stats.deadline_misses == 0


def test_inpainting_reaches_the_new_chunk(cpp_policy):
    """async-inpaint differs from async only after the first switch (the prefix really is passed)."""
    stream = _stream(cpp_policy, 40)
    plain, s1, _ = _drive(make_controller(cpp_policy, execution="async", delay=2, seed=SEED), stream)
    inpainted, s2, _ = _drive(make_controller(cpp_policy, execution="async-inpaint", delay=2, seed=SEED), stream)
    assert s1 == s2
    first = s1.index(True, 1)
    np.testing.assert_array_equal(plain[:first], inpainted[:first])
    assert not np.allclose(plain[first:], inpainted[first:])


def test_make_controller_picks_by_backend(cpp_policy, tiny_bundles):
    ort = load_policy(tiny_bundles["lowdim"], backend="ort", threads=1)
    with make_controller(ort, delay=1) as ctl:
        assert type(ctl) is RealTimeController
    with make_controller(cpp_policy, delay=1) as ctl:
        assert type(ctl) is CppRealTimeController
        assert ctl.choice.name == cpp_policy.resolve_sampler().name
    with make_controller(cpp_policy, delay=1, clock=lambda: 0.0) as ctl:  # a Python clock: the reference
        assert type(ctl) is RealTimeController


def test_batch_comes_from_the_first_step(cpp_policy):
    stream = _stream(cpp_policy, 3, batch=2)
    with make_controller(cpp_policy, delay=1) as ctl:
        assert ctl.step(stream[0]).shape == (2, cpp_policy.action_dim)
        with pytest.raises(DpkitError, match="has shape"):
            ctl.step({k: v[:1] for k, v in stream[1].items()})  # the batch is fixed from then on


def test_wall_clock_measures_the_delay(cpp_policy):
    stream = _stream(cpp_policy, 30, batch=1)
    with make_controller(cpp_policy, execution="async", delay=None, period=0.01) as ctl:
        for obs in stream:
            ctl.step(obs)
            threading.Event().wait(0.01)
        assert 1 <= ctl.expected_delay() <= cpp_policy.n_action_steps
        stats = ctl.stats
    assert stats.chunks >= 2 and stats.ticks == 30
    assert stats.as_dict()["latency_ms"]["max"] > 0


def test_the_policy_stays_usable_while_a_controller_runs(cpp_policy):
    stream = _stream(cpp_policy, 20, batch=1)
    obs = {k: np.repeat(v[:, None], cpp_policy.n_obs_steps, axis=1) for k, v in stream[0].items()}
    with make_controller(cpp_policy, execution="async", delay=None) as ctl:
        for o in stream:
            ctl.step(o)
            assert cpp_policy.sample(obs, seed=1).shape == (1, cpp_policy.horizon, cpp_policy.action_dim)


@pytest.mark.parametrize("kwargs, message", [
    ({"execution": "later"}, "execution must be one of"),
    ({"delay": -1}, "delay must be an integer in \\[0, 8\\]"),  # None is the wall clock, as in the reference
    ({"delay": 9}, "delay must be an integer in \\[0, 8\\]"),
    ({"delay": 2.5}, "delay must be an integer"),
    ({"margin": -1}, "margin must be an integer in"),
    ({"blend": -2}, "blend must be an integer in"),
    ({"period": 0}, "period must be"),
    ({"seed": -3}, "seed must be"),
    ({"batch": 3}, "batch must be an integer in \\[1, 2\\]"),
    ({"sampler": "euler"}, "euler"),
])
def test_bad_settings_are_clear_errors(cpp_policy, kwargs, message):
    with pytest.raises(DpkitError, match=message):
        make_controller(cpp_policy, **kwargs)


def test_bad_steps_and_closed_controller(cpp_policy):
    ctl = make_controller(cpp_policy, delay=1, batch=1)
    name = cpp_policy.obs_keys[0]
    with pytest.raises(DpkitError, match="do not match"):
        ctl.step({"image": np.zeros((1, 3))})
    with pytest.raises(DpkitError, match="has shape"):
        ctl.step({name: np.zeros((1, 3), np.float32)})
    with pytest.raises(DpkitError, match="NaN or Inf"):
        ctl.step({name: np.full((1, 20), np.nan, np.float32)})
    with pytest.raises(DpkitError, match="must be a dict"):
        ctl.step("obs")
    assert ctl.step({name: np.zeros((1, 20), np.float32)}).shape == (1, cpp_policy.action_dim)
    ctl.close()
    with pytest.raises(DpkitError, match="closed"):
        ctl.step({name: np.zeros((1, 20), np.float32)})
