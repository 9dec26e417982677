"""Inpainted continuation: a committed prefix in every reverse step, the same in every backend."""

from __future__ import annotations

import numpy as np
import pytest

from dpkit.errors import DpkitError
from dpkit.runtime import load_policy
from dpkit.runtime.parity import injected_noise, random_observations

BACKENDS = ["torch", "ort", "cpp"]


@pytest.fixture(scope="module")
def policies(tiny_runs, tiny_bundles):
    out = {"torch": load_policy(tiny_runs["lowdim"], backend="torch"),
           "ort": load_policy(tiny_bundles["lowdim"], backend="ort", threads=1)}
    try:
        import dpkit.runtime._core  # noqa: F401
    except ImportError:
        return out
    out["cpp"] = load_policy(tiny_bundles["lowdim"], backend="cpp", threads=1, max_batch=4)
    return out


def _case(policy, sampler, steps, n_prefix=3, batch=2):
    obs = random_observations(policy.observations, policy.n_obs_steps, batch, seed=3)
    x, noise = injected_noise(batch, policy.horizon, policy.action_dim, steps, seed=4)
    prefix = np.random.default_rng(5).uniform(-0.8, 0.8, (batch, n_prefix, policy.action_dim)).astype(np.float32)
    return obs, x, noise, prefix


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("ddpm", 100)])
def test_hard_prefix_is_continued_identically_in_every_backend(policies, sampler, steps):
    ref = policies["ort"]
    obs, x, noise, prefix = _case(ref, sampler, steps)
    start = ref.spec.first_action_index
    trajs = {b: p.sample(obs, sampler, steps, initial_noise=x, step_noise=noise, prefix=prefix)
             for b, p in policies.items()}
    for b, traj in trajs.items():
        np.testing.assert_allclose(traj, trajs["ort"], atol=1e-4, err_msg=b)
    # the final alpha_cumprod is 1: the committed rows are the prefix itself
    np.testing.assert_allclose(trajs["ort"][:, start:start + prefix.shape[1]], prefix, atol=1e-6)
    free = ref.sample(obs, sampler, steps, initial_noise=x, step_noise=noise)
    assert not np.allclose(free[:, start:start + 3], prefix, atol=1e-2)  # it really changed something


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_blend_and_zero_weight_is_no_prefix(policies, backend):
    if backend not in policies:
        pytest.skip("the C++ module is not built")
    p = policies[backend]
    obs, x, noise, prefix = _case(p, "ddim", 5)
    free = p.sample(obs, "ddim", 5, initial_noise=x)
    zero = p.sample(obs, "ddim", 5, initial_noise=x, prefix=prefix, prefix_weights=np.zeros(3))
    np.testing.assert_allclose(zero, free, atol=1e-5)
    soft = p.sample(obs, "ddim", 5, initial_noise=x, prefix=prefix, prefix_weights=[1.0, 0.5, 0.25])
    hard = p.sample(obs, "ddim", 5, initial_noise=x, prefix=prefix)
    i = p.spec.first_action_index
    np.testing.assert_allclose(soft[:, i], prefix[:, 0], atol=1e-6)  # weight 1 row is exact
    assert not np.allclose(soft[:, i + 1:i + 3], hard[:, i + 1:i + 3], atol=1e-4)


def test_predict_action_prefix_is_in_environment_units(policies):
    p = policies["ort"]
    obs, x, _, prefix = _case(p, "ddim", 5)
    env_prefix = prefix * p.spec.action_scale.astype(np.float32) + p.spec.action_offset.astype(np.float32)
    actions = p.predict_action(obs, "ddim", 5, initial_noise=x, prefix=env_prefix)
    np.testing.assert_allclose(actions[:, :3], env_prefix, atol=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    ({"prefix": np.zeros((2, 20, 2))}, "does not fit the horizon"),
    ({"prefix": np.zeros((2, 3, 3))}, "prefix has shape"),
    ({"prefix": np.zeros((1, 3, 2))}, "prefix has shape"),
    ({"prefix": np.zeros((2, 0, 2))}, "prefix has shape"),
    ({"prefix": np.zeros((2, 3, 2)), "prefix_start": -1}, "does not fit"),
    ({"prefix": np.zeros((2, 3, 2)), "prefix_start": 15}, "does not fit"),
    ({"prefix": np.zeros((2, 3, 2)), "prefix_weights": [1, 2, 0]}, "weights must be 3 values in"),
    ({"prefix": np.zeros((2, 3, 2)), "prefix_weights": [1, 1]}, "weights must be 3 values in"),
    ({"prefix": np.full((2, 3, 2), np.nan)}, "NaN"),
    ({"prefix": np.full((2, 3, 2), "a")}, "float array"),
    ({"prefix_weights": [1.0]}, "without a prefix"),
])
def test_bad_prefixes_are_clear_errors(policies, kwargs, message):
    for p in policies.values():
        obs = random_observations(p.observations, p.n_obs_steps, 2)
        with pytest.raises(DpkitError, match=message):
            p.sample(obs, "ddim", 5, **kwargs)
