"""The one backend contract: every backend resolves, checks and samples through the shared PolicyBackend.

The same calls go to "torch" (a checkpoint), "ort" and "cpp" (its bundle): bad arguments get the same
one-line DpkitError everywhere, the default sampler is the same, and one seed gives one trajectory.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpkit.errors import DpkitError
from dpkit.runtime import load_policy
from dpkit.runtime.backend import PolicyBackend
from dpkit.runtime.parity import random_observations, trajectory_errors
from dpkit.sampling_args import MAX_SEED

BACKENDS = ["torch", "ort", "cpp"]


def _load(backend, tiny_runs, tiny_bundles, mode="lowdim"):
    if backend == "torch":
        return load_policy(tiny_runs[mode], backend="torch")
    if backend == "cpp":
        pytest.importorskip("dpkit.runtime._core")
        return load_policy(tiny_bundles[mode], backend="cpp", threads=1, max_batch=4)
    return load_policy(tiny_bundles[mode], backend="ort", threads=1)


def _obs(policy, batch=2, seed=0):
    return random_observations(policy.observations, policy.n_obs_steps, batch, seed)


@pytest.fixture(scope="module")
def policies(tiny_runs, tiny_bundles):
    return {b: _load(b, tiny_runs, tiny_bundles) for b in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, message", [
    ({"steps": "abc"}, "steps must be an integer"),
    ({"steps": 10.6}, "steps must be an integer"),
    ({"steps": 10.0}, "steps must be an integer"),
    ({"steps": True}, "steps must be an integer"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": 5, "num_inference_steps": 10}, "disagree"),
    ({"seed": -1}, "seed must be an integer in"),
    ({"seed": "abc"}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"sampler": "euler"}, "unknown sampler 'euler'"),
    ({"sampler": 3}, "unknown sampler 3"),
    ({"initial_noise": np.full((2, 16, 2), "x")}, "initial_noise must be a float array"),
    ({"initial_noise": np.zeros((2, 16, 3), np.float32)}, "initial_noise has shape"),
    ({"initial_noise": [[0.0, 1.0], [0.0]]}, "initial_noise is not a rectangular array"),
])
def test_bad_arguments_are_one_clear_error(policies, backend, kwargs, message):
    policy = policies[backend]
    with pytest.raises(DpkitError, match=message) as e:
        policy.predict_action(_obs(policy), **kwargs)
    assert "\n" not in str(e.value)


def test_a_seed_at_the_limit_is_one_trajectory_in_every_backend(policies):
    """dpkit.sampling_args.MAX_SEED is accepted by every backend, and one past it is refused."""
    obs = _obs(policies["ort"])
    trajs = {b: p.sample(obs, "ddim", 5, seed=MAX_SEED) for b, p in policies.items()}
    for b, traj in trajs.items():
        np.testing.assert_allclose(traj, trajs["ort"], atol=1e-4, err_msg=b)
        with pytest.raises(DpkitError, match="seed must be an integer in"):
            policies[b].sample(obs, "ddim", 5, seed=MAX_SEED + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_observations_are_one_clear_error(policies, backend):
    policy = policies[backend]
    good = _obs(policy)
    (name,) = policy.obs_keys
    cases = [
        ({name: [[[0.0] * 20, [0.0] * 20], [[0.0] * 20]]}, "not a rectangular array"),
        ({name: good[name].astype(str)}, "dtype"),
        ({name: good[name].astype(bool)}, "dtype"),
        ({"other": good[name]}, "do not match"),
        ([good[name]], "must be a dict"),
        ({name: good[name][:, :1]}, "shape"),
        ({name: np.where(good[name] > 200, np.nan, good[name]).astype(np.float32)}, "NaN|finite"),
        ({name: np.float32(1.0)}, "shape"),
    ]
    for obs, message in cases:
        with pytest.raises(DpkitError, match=message):
            policy.sample(obs)


def test_every_backend_is_the_shared_contract(policies):
    for policy in policies.values():
        assert isinstance(policy, PolicyBackend)
        assert policy.obs_keys == ("obs",) and policy.n_obs_steps >= 1


@pytest.mark.parametrize("sampler, steps", [(None, None), ("ddim", None), (None, 5), ("ddpm", None), ("ddpm", 100)])
def test_default_sampler_rule_is_the_same_everywhere(policies, sampler, steps):
    names = {b: p.resolve_sampler(sampler, steps).name for b, p in policies.items()}
    assert len(set(names.values())) == 1, names
    if sampler is None and steps is None:
        assert names["ort"].startswith("ddim-")  # the bundles' default, and now the PyTorch policy's too


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("ddpm", 100)])
def test_one_seed_one_trajectory_in_every_backend(policies, sampler, steps):
    obs = _obs(policies["ort"], batch=3, seed=1)
    errs = trajectory_errors(policies["ort"], policies, obs, sampler, steps)  # injected noise
    assert max(errs.values()) <= 1e-4, errs
    trajs = {b: p.sample(obs, sampler, steps, seed=7) for b, p in policies.items()}  # noise drawn from the seed
    for b, traj in trajs.items():
        assert traj.shape == (3, policies[b].horizon, policies[b].action_dim)
        np.testing.assert_allclose(traj, trajs["ort"], atol=1e-4, err_msg=b)
    actions = {b: p.predict_action(obs, sampler, num_inference_steps=steps, seed=7) for b, p in policies.items()}
    for b, a in actions.items():
        np.testing.assert_allclose(a, actions["ort"], atol=1e-3, err_msg=b)
    # a different seed is different noise
    assert not np.allclose(policies["ort"].sample(obs, sampler, steps, seed=8), trajs["ort"])


def test_cpp_max_batch_is_bounded(tiny_bundles):
    pytest.importorskip("dpkit.runtime._core")
    for bad in (10**9, 0, -1):
        with pytest.raises(DpkitError, match="max_batch"):
            load_policy(tiny_bundles["lowdim"], backend="cpp", max_batch=bad)
    with pytest.raises(DpkitError, match="max_batch must be an integer"):
        load_policy(tiny_bundles["lowdim"], backend="cpp", max_batch="8")
    policy = load_policy(tiny_bundles["lowdim"], backend="cpp", threads=1, max_batch=2)
    with pytest.raises(DpkitError, match="max_batch"):
        policy.sample(_obs(policy, batch=3))
