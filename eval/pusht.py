"""The PushT environment as the original Diffusion Policy evaluation saw it, on top of gym-pusht.

    from dpkit.eval.pusht import make_env, reset_legacy, observe
    env = make_env("lowdim")
    raw = reset_legacy(env, 100000)           # the original protocol's first test start state
    step_obs = observe(env, "lowdim", raw)    # {"obs": (20,) float32}: 9 keypoints + agent x, y

What this module adds to gym-pusht (0.1.8):
- the legacy test start states (`legacy_start_state`): `env.reset(seed=...)` draws different ones;
- the dataset's 9 block keypoints (`block_keypoints`): gym-pusht only offers the 8 rectangle corners;
- an exact state restore (`restore_state`): `reset_to_state` sets the block position before its angle,
  which shifts the block (~17 px for dataset states) because the angle turns it about its centre of gravity;
- per-step observations in the bundle's layout (`observe`) and a video frame with the goal and the
  coverage drawn (`render_frame`).

Coordinates are gym-pusht's: pixels of the 512x512 world, x right, y down; angles in radians.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dpkit.errors import DpkitError, cli_entry

ENV_ID = "gym_pusht/PushT-v0"
OBS_MODES = ("image", "lowdim")
MAX_STEPS = 300
"""Episode length of the original protocol (and gym-pusht's `max_episode_steps`)."""
LEGACY_TEST_SEED = 100000
"""First test seed of the original protocol; its 50 test episodes use 100000..100049."""
N_TEST_EPISODES = 50
SUCCESS_COVERAGE = 0.95
"""gym-pusht: reward = clip(coverage / 0.95, 0, 1); success = coverage > 0.95."""
GOAL_POSE = (256.0, 256.0, np.pi / 4)
"""Goal block pose (x, y, angle), fixed in gym-pusht."""

# The dataset's 9 keypoints in the block's body frame (pymunk body origin, which is the middle of the
# top edge of the T's bar; the stem points along +y). Derived by `derive_block_keypoints` from the real
# dataset (data/state + data/keypoint, all 25,650 steps): mean residual 0.003 px, max 2.17 px (a few
# hundred recorded keypoints are off by up to 2 px; the rest agree to < 0.1 px).
# `python -m dpkit.eval.pusht --derive-keypoints DATASET` reprints them; a dataset test re-derives them.
BLOCK_KEYPOINTS_LOCAL = np.array(
    [
        [9.2695, 90.0411],
        [-60.9833, -1.1870],
        [60.9129, -1.3930],
        [-0.2705, 25.5437],
        [-14.0653, 122.8158],
        [39.0027, 32.8576],
        [-39.9664, 32.7295],
        [-16.8245, 62.8632],
        [23.5416, -1.7001],
    ],
    dtype=np.float64,
)


def legacy_start_state(seed: int) -> np.ndarray:
    """The original evaluation's start state for `seed`: (agent x, y, block x, y, block angle)."""
    rs = np.random.RandomState(seed)
    return np.array(
        [
            rs.randint(50, 450),
            rs.randint(50, 450),
            rs.randint(100, 400),
            rs.randint(100, 400),
            rs.randn() * 2 * np.pi - np.pi,
        ],
        dtype=np.float64,
    )


def block_keypoints(block_pose: np.ndarray) -> np.ndarray:
    """The dataset's 9 keypoints (..., 9, 2) from block poses (..., 3) = (x, y, angle).

    kp = R(angle) @ local + (x, y) with R the counter-clockwise rotation in (x, y) (pymunk's
    `local_to_world`); checked against the dataset, where the opposite sign leaves 181 px residuals.
    """
    pose = np.asarray(block_pose, dtype=np.float64)
    c, s = np.cos(pose[..., 2])[..., None], np.sin(pose[..., 2])[..., None]
    lx, ly = BLOCK_KEYPOINTS_LOCAL[:, 0], BLOCK_KEYPOINTS_LOCAL[:, 1]
    x = c * lx - s * ly + pose[..., 0:1]
    y = s * lx + c * ly + pose[..., 1:2]
    return np.stack([x, y], axis=-1)


def derive_block_keypoints(states: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares body-frame keypoints from states (N, 5) and world keypoints (N, 9, 2).

    With the pose known, kp - p = R(angle) @ local is linear in `local`, and R is orthogonal, so the
    least-squares solution is the mean of R(angle)^T (kp - p). Returns (local (9, 2), max residual px).
    """
    states = np.asarray(states, dtype=np.float64)
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if states.ndim != 2 or states.shape[1] != 5 or keypoints.shape != (len(states), 9, 2):
        raise DpkitError(f"expected states (N, 5) and keypoints (N, 9, 2), got {states.shape} and {keypoints.shape}")
    c, s = np.cos(states[:, 4])[:, None], np.sin(states[:, 4])[:, None]
    d = keypoints - states[:, None, 2:4]
    local_all = np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)
    local = local_all.mean(axis=0)
    residual = float(np.linalg.norm(local_all - local, axis=-1).max())
    return local, residual


# ---------------------------------------------------------------------------------------------------
# The environment


def make_env(obs_mode: str, video_size: int = 256) -> Any:
    """A headless gym-pusht env for `obs_mode`; `env.render()` gives (video_size, video_size, 3) frames.

    Low-dim policies need no pixels, so their env observes the state (about 8x cheaper per step).
    The env checker is off: it only warns, e.g. about the legacy start angles outside [0, 2 pi].
    """
    if obs_mode not in OBS_MODES:
        raise DpkitError(f"unknown observation mode {obs_mode!r} (expected one of {', '.join(OBS_MODES)})")
    try:
        import gymnasium as gym
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
    except ImportError as e:
        raise DpkitError(f"evaluation needs gym-pusht ({e}); install it with: pip install 'dpkit[eval]'") from None
    return gym.make(
        ENV_ID,
        obs_type="pixels_agent_pos" if obs_mode == "image" else "state",
        render_mode="rgb_array",
        visualization_width=video_size,
        visualization_height=video_size,
        # The evaluation loop owns the step limit: it ignores `truncated` (gym-pusht sets it at 300).
        disable_env_checker=True,
    )


def reset_legacy(env: Any, seed: int) -> Any:
    """Reset to the original protocol's start state for `seed`; returns the raw gym observation.

    `reset_to_state` keeps the legacy assignment order (position, then angle), exactly like the original
    environment did with these states, so the starts match the paper's evaluation.
    """
    raw, _ = env.reset(seed=int(seed), options={"reset_to_state": legacy_start_state(seed)})
    return raw


def env_state(env: Any) -> np.ndarray:
    """Current (agent x, y, block x, y, block angle), angle not wrapped."""
    u = env.unwrapped
    return np.array([*u.agent.position, *u.block.position, u.block.angle], dtype=np.float64)


def restore_state(env: Any, state: np.ndarray) -> Any:
    """Put the env exactly in `state` (agent x, y, block x, y, angle), e.g. a dataset state.

    Resets first (fresh space, zero velocities), then sets the angle *before* the position so the block
    ends where `state` says. Returns the raw gym observation of the restored state.
    """
    state = np.asarray(state, dtype=np.float64)
    if state.shape != (5,) or not np.all(np.isfinite(state)):
        raise DpkitError(f"a PushT state is 5 finite numbers (agent x, y, block x, y, angle), got {state!r}")
    env.reset()
    u = env.unwrapped
    u.agent.position = (float(state[0]), float(state[1]))
    u.agent.velocity = (0.0, 0.0)
    u.block.velocity = (0.0, 0.0)
    u.block.angular_velocity = 0.0
    u.block.angle = float(state[4])
    u.block.position = (float(state[2]), float(state[3]))
    # Shapes cache their world vertices; re-index so rendering and coverage see the new pose without
    # a physics step (which could push overlapping bodies apart).
    u.space.reindex_shapes_for_body(u.block)
    u.space.reindex_shapes_for_body(u.agent)
    return u.get_obs()


def coverage(env: Any) -> float:
    """Fraction of the goal T covered by the block."""
    return float(env.unwrapped._get_coverage())


OBS_NAMES = ("image", "agent_pos", "obs", "state", "environment_state")
"""Observations PushT gives a policy, by the name in its observation spec (the bundle's / run's):
image (3, 96, 96) in [0, 1]; agent_pos and lerobot's state: agent x, y; obs: the dataset's 9 keypoints then
agent x, y; environment_state: gym-pusht's 8 block corners (lerobot's keypoint policies), all in pixels."""


def block_corners(env: Any) -> np.ndarray:
    """(16,) gym-pusht's `environment_state`: the T's two rectangles' corners x0, y0, ..., x7, y7 (pixels)."""
    u = env.unwrapped
    return np.asarray(type(u).get_keypoints(u._block_shapes), dtype=np.float64).reshape(-1)


def observe(env: Any, obs_mode: str, raw: Any, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """One step's observation in the policy's layout (no batch or time axis).

    image:  {"image": (3, 96, 96) float32 in [0, 1], "agent_pos": (2,) float32 pixels}
    lowdim: {"obs": (20,) float32} = 9 keypoints x0, y0, ..., x8, y8, then agent x, y
    `keys` (a policy's observation names, see OBS_NAMES) selects and adds others, e.g. a converted
    lerobot keypoint policy's ("state", "environment_state").
    """
    if obs_mode == "image":
        pixels = np.asarray(raw["pixels"])
        out = {
            "image": np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0),
            "agent_pos": np.asarray(raw["agent_pos"], dtype=np.float32),
        }
    elif obs_mode == "lowdim":
        # The "state" observation wraps the angle to [0, 2 pi); rotation does not care.
        state = np.asarray(raw, dtype=np.float64)
        kp = block_keypoints(state[2:5]).reshape(-1)
        out = {"obs": np.concatenate([kp, state[:2]]).astype(np.float32), "agent_pos": state[:2].astype(np.float32)}
    else:
        raise DpkitError(f"unknown observation mode {obs_mode!r} (expected one of {', '.join(OBS_MODES)})")
    if keys is None:
        return {k: out[k] for k in ("image", "agent_pos") if k in out} if obs_mode == "image" else {"obs": out["obs"]}
    result = {}
    for k in keys:
        if k == "state":
            result[k] = out["agent_pos"]
        elif k == "environment_state":
            result[k] = block_corners(env).astype(np.float32)
        elif k == "obs" and k not in out:
            state = env_state(env)
            result[k] = np.concatenate([block_keypoints(state[2:5]).reshape(-1), state[:2]]).astype(np.float32)
        elif k in out:
            result[k] = out[k]
        else:
            raise DpkitError(f"PushT ({obs_mode} env) cannot give observation {k!r} (it gives: {', '.join(OBS_NAMES)})")
    return result


# ---------------------------------------------------------------------------------------------------
# Video frames


def _goal_polygons(size: int) -> list[np.ndarray]:
    """The goal T's two rectangles as int32 pixel polygons in a size x size frame."""
    x, y, a = GOAL_POSE
    c, s = np.cos(a), np.sin(a)
    # gym-pusht's tee (scale 30, length 4): the bar, then the stem, in the body frame.
    rects = [
        np.array([[-60, 30], [60, 30], [60, 0], [-60, 0]], dtype=np.float64),
        np.array([[-15, 30], [-15, 120], [15, 120], [15, 30]], dtype=np.float64),
    ]
    out = []
    for r in rects:
        world = np.stack([c * r[:, 0] - s * r[:, 1] + x, s * r[:, 0] + c * r[:, 1] + y], axis=-1)
        out.append(np.round(world * size / 512.0).astype(np.int32))
    return out


def render_frame(env: Any, cover: float, step: int, seed: int) -> np.ndarray:
    """A video frame: gym-pusht's render (goal filled light green, last action marked) with the goal
    outlined on top (the block hides the fill once it covers it) and the coverage/step written in."""
    import cv2  # installed with gym-pusht

    frame = np.ascontiguousarray(env.render())
    size = frame.shape[0]
    cv2.polylines(frame, _goal_polygons(size), isClosed=True, color=(0, 140, 0), thickness=max(1, size // 200))
    success = cover > SUCCESS_COVERAGE
    text = f"seed {seed}  step {step}  coverage {cover:.2f}{'  success' if success else ''}"
    scale = size / 640.0
    cv2.putText(frame, text, (4, max(12, int(18 * scale))), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (0, 120, 0) if success else (0, 0, 0), 1, cv2.LINE_AA)
    return frame


def load_dataset_keypoints(path: str) -> tuple[np.ndarray, np.ndarray]:
    """data/state (N, 5) and data/keypoint (N, 9, 2) from a PushT zarr folder or .zarr.zip."""
    try:
        import zarr
    except ImportError:
        raise DpkitError("reading the dataset needs zarr: pip install 'dpkit[train]'") from None
    p = Path(path)
    if not p.exists():
        raise DpkitError(f"dataset {p} does not exist")
    if p.suffix == ".zip":
        # zarr-python 3 keeps ZipStore under zarr.storage, zarr 2 at the top level.
        zip_store = getattr(zarr.storage, "ZipStore", None) or zarr.ZipStore
        group = zarr.open_group(zip_store(str(p), mode="r"), mode="r")
    else:
        group = zarr.open_group(str(p), mode="r")
    return np.asarray(group["data/state"][:]), np.asarray(group["data/keypoint"][:])


@cli_entry
def _main() -> None:
    """`python -m dpkit.eval.pusht --derive-keypoints DATASET`: re-derive BLOCK_KEYPOINTS_LOCAL."""
    import argparse

    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("--derive-keypoints", metavar="DATASET", required=True, help=".zarr folder or .zarr.zip")
    args = p.parse_args()
    states, keypoints = load_dataset_keypoints(args.derive_keypoints)
    local, residual = derive_block_keypoints(states, keypoints)
    np.set_printoptions(suppress=True)
    print(np.array2string(local, precision=4, separator=", "))
    print(f"max residual {residual:.3f} px over {len(states)} states")


if __name__ == "__main__":
    _main()
