"""The PushT environment side of evaluation: legacy starts, exact restore, keypoints, observations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from dpkit.errors import DpkitError  # noqa: E402
from dpkit.eval import pusht  # noqa: E402

DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "pusht" / "pusht_cchi_v7_replay.zarr.zip"


def test_legacy_start_states_match_the_notes_recipe():
    # The original protocol's recipe (np.random.RandomState(seed): randint x4, then randn * 2 pi - pi).
    np.testing.assert_allclose(pusht.legacy_start_state(100000), [235, 124, 335, 128, -0.9049274284], atol=1e-9)
    np.testing.assert_allclose(pusht.legacy_start_state(100049), [143, 388, 104, 324, -13.4129879639], atol=1e-9)
    starts = np.stack([pusht.legacy_start_state(s) for s in range(100000, 100050)])
    assert np.all((starts[:, :2] >= 50) & (starts[:, :2] < 450))
    assert np.all((starts[:, 2:4] >= 100) & (starts[:, 2:4] < 400))
    assert len(np.unique(starts[:, 4])) == 50


def test_reset_legacy_reproduces_the_start_positions():
    env = pusht.make_env("lowdim")
    for seed in (100000, 100007, 100049):
        s = pusht.legacy_start_state(seed)
        raw = pusht.reset_legacy(env, seed)
        u = env.unwrapped
        np.testing.assert_allclose(u.agent.position, s[:2], atol=1e-9)
        assert u.block.angle == pytest.approx(s[4], abs=1e-12)
        # Legacy order: position set at angle 0, then the angle turns the block about its centre of
        # gravity (0, 45) in the body frame -- so the CoG stays where (x, y) put it.
        np.testing.assert_allclose(u.block.local_to_world(u.block.center_of_gravity), s[2:4] + [0, 45], atol=1e-6)
        np.testing.assert_allclose(raw[:2], s[:2], atol=1e-9)
        # Resetting again gives the same start (nothing carries over between episodes).
        np.testing.assert_array_equal(pusht.reset_legacy(env, seed), raw)
    env.close()


def test_restore_state_is_exact():
    env = pusht.make_env("lowdim")
    state = np.array([100.5, 200.25, 300.0, 250.0, 2.5])
    raw = pusht.restore_state(env, state)
    np.testing.assert_allclose(pusht.env_state(env), state, atol=1e-9)
    np.testing.assert_allclose(raw, [*state[:4], state[4] % (2 * np.pi)], atol=1e-9)
    # The legacy path would have moved the block: make sure the two differ (the reason restore exists).
    raw_legacy, _ = env.reset(options={"reset_to_state": state})
    assert np.abs(raw_legacy[2:4] - state[2:4]).max() > 5
    with pytest.raises(DpkitError, match="5 finite numbers"):
        pusht.restore_state(env, [1, 2, 3])
    env.close()


def test_block_keypoints_rotate_with_the_simulator():
    local = pusht.BLOCK_KEYPOINTS_LOCAL
    np.testing.assert_allclose(pusht.block_keypoints([10, 20, 0]), local + [10, 20], atol=1e-12)
    # A quarter turn counter-clockwise in (x, y): (lx, ly) -> (-ly, lx).
    np.testing.assert_allclose(pusht.block_keypoints([0, 0, np.pi / 2]), np.stack([-local[:, 1], local[:, 0]], -1), atol=1e-9)
    # Same convention as pymunk's body frame, at several poses in a real env.
    env = pusht.make_env("lowdim")
    for pose in ([256, 256, 0.3], [120, 380, -2.0], [400, 100, 5.5]):
        pusht.restore_state(env, [50, 50, *pose])
        body = env.unwrapped.block
        expected = np.array([body.local_to_world(tuple(p)) for p in local])
        np.testing.assert_allclose(pusht.block_keypoints(pose), expected, atol=1e-9)
    env.close()
    # Batched poses.
    poses = np.array([[1, 2, 0.1], [3, 4, 0.2]])
    assert pusht.block_keypoints(poses).shape == (2, 9, 2)


def test_derive_block_keypoints_recovers_a_synthetic_set():
    rng = np.random.default_rng(0)
    n = 500
    states = np.column_stack([rng.uniform(0, 512, (n, 4)), rng.uniform(-np.pi, np.pi, n)])
    keypoints = pusht.block_keypoints(states[:, 2:5]) + rng.normal(0, 0.3, (n, 9, 2))
    local, residual = pusht.derive_block_keypoints(states, keypoints)
    np.testing.assert_allclose(local, pusht.BLOCK_KEYPOINTS_LOCAL, atol=0.1)
    assert 0.5 < residual < 3
    with pytest.raises(DpkitError, match="expected states"):
        pusht.derive_block_keypoints(states[:, :4], keypoints)


def test_observations_per_mode():
    env = pusht.make_env("lowdim")
    raw = pusht.reset_legacy(env, 100000)
    o = pusht.observe(env, "lowdim", raw)
    assert list(o) == ["obs"] and o["obs"].shape == (20,) and o["obs"].dtype == np.float32
    s = pusht.env_state(env)
    np.testing.assert_allclose(o["obs"][:18].reshape(9, 2), pusht.block_keypoints(s[2:5]), atol=1e-3)
    np.testing.assert_allclose(o["obs"][18:], s[:2], atol=1e-4)
    env.close()

    env = pusht.make_env("image")
    raw = pusht.reset_legacy(env, 100000)
    o = pusht.observe(env, "image", raw)
    assert list(o) == ["image", "agent_pos"]
    assert o["image"].shape == (3, 96, 96) and o["image"].dtype == np.float32
    assert 0.0 <= o["image"].min() and o["image"].max() <= 1.0 and o["image"].max() > 0.9
    np.testing.assert_allclose(o["image"], raw["pixels"].transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert o["agent_pos"].shape == (2,) and o["agent_pos"].dtype == np.float32
    np.testing.assert_allclose(o["agent_pos"], [235, 124])
    frame = pusht.render_frame(env, 0.5, 0, 100000)
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    env.close()
    with pytest.raises(DpkitError, match="unknown observation mode"):
        pusht.make_env("state")


@pytest.mark.dataset
def test_keypoints_match_the_dataset():
    if not DATASET.exists():
        pytest.skip(f"real dataset not found at {DATASET}")
    pytest.importorskip("zarr")
    states, keypoints = pusht.load_dataset_keypoints(str(DATASET))
    local, residual = pusht.derive_block_keypoints(states, keypoints)
    assert residual < 3.0
    np.testing.assert_allclose(local, pusht.BLOCK_KEYPOINTS_LOCAL, atol=1e-3)
    err = np.linalg.norm(pusht.block_keypoints(states[:, 2:5]) - keypoints, axis=-1)
    assert err.max() < 3.0 and err.mean() < 0.05
    # Through the env: restore dataset states, observe, compare with the recorded keypoints.
    env = pusht.make_env("lowdim")
    for i in range(0, len(states), 2500):
        o = pusht.observe(env, "lowdim", pusht.restore_state(env, states[i]))["obs"]
        np.testing.assert_allclose(o[:18].reshape(9, 2), keypoints[i], atol=3.0)
        np.testing.assert_allclose(o[18:], states[i, :2], atol=1e-3)
    env.close()
