"""Small synthetic stores in the layout of the PushT replay (pusht_cchi_v7_replay.zarr), for tests.

    from synthetic import make_synthetic_pusht      # tests/ is on sys.path under pytest
    store = make_synthetic_pusht(tmp_path / "pusht.zarr", n_episodes=4)

Same arrays, dtypes and zarr format (2) as the real file, with images stored as float32 0-255. The agent
follows a smooth random walk and the action is its next position, so a policy can learn something;
every value differs from its neighbours, so tests can tell which frame a padded window repeated.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np


def _render(agent: np.ndarray, block: np.ndarray) -> np.ndarray:
    """A 96x96 RGB float32 frame (0-255): grey background, a dark block square, a blue agent dot."""
    img = np.full((96, 96, 3), 230.0, dtype=np.float32)
    bx, by = (block[:2] / 512 * 96).astype(int).clip(4, 91)
    img[by - 4 : by + 5, bx - 4 : bx + 5] = (110.0, 110.0, 110.0)
    ax, ay = (agent / 512 * 96).astype(int).clip(2, 93)
    img[ay - 2 : ay + 3, ax - 2 : ax + 3] = (40.0, 60.0, 220.0)
    return img


def make_synthetic_pusht(
    path,
    n_episodes: int = 4,
    lengths=None,
    with_images: bool = True,
    zip: bool = False,
    seed: int = 0,
) -> Path:
    """Write a store at `path` (a `.zarr` folder, or a `.zarr.zip` when zip=True) and return its path.

    `lengths` gives each episode's length (default: 20, 25, 30, ... ); n_episodes is then len(lengths).
    """
    import zarr

    path = Path(path)
    rng = np.random.default_rng(seed)
    lengths = list(lengths) if lengths is not None else [20 + 5 * i for i in range(n_episodes)]
    ends = np.cumsum(lengths).astype(np.int64)
    n = int(ends[-1])

    state = np.zeros((n, 5), dtype=np.float32)
    action = np.zeros((n, 2), dtype=np.float32)
    start = 0
    for end in ends:
        length = end - start
        pos = rng.uniform(100, 400, size=2)
        vel = rng.normal(0, 6, size=2)
        agent = np.zeros((length + 1, 2))
        for t in range(length + 1):
            agent[t] = pos
            vel = 0.9 * vel + rng.normal(0, 3, size=2)
            pos = np.clip(pos + vel, 15, 495)
        block = np.concatenate([rng.uniform(150, 350, size=2), rng.uniform(-np.pi, np.pi, size=1)])
        # The block drifts a little so keypoints vary within the episode.
        drift = np.linspace(0, 1, length)[:, None] * rng.normal(0, 20, size=3) * np.array([1, 1, 0.05])
        state[start:end, :2] = agent[:-1]
        state[start:end, 2:] = block + drift
        action[start:end] = agent[1:]
        start = end

    # 9 keypoints rigidly attached to the block (like the real data's keypoint manager).
    local = rng.uniform(-30, 30, size=(9, 2))
    ang = state[:, 4]
    rot = np.stack([np.stack([np.cos(ang), -np.sin(ang)], -1), np.stack([np.sin(ang), np.cos(ang)], -1)], -2)
    keypoint = (np.einsum("nij,kj->nki", rot, local) + state[:, None, 2:4]).astype(np.float32)

    target = path.parent / (path.name + ".tmpdir") if zip else path
    if target.exists():
        shutil.rmtree(target)
    root = zarr.open_group(str(target), mode="w", zarr_format=2)
    chunk = 16

    def put(name: str, data: np.ndarray) -> None:
        arr = root.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(chunk,) + data.shape[1:])
        arr[:] = data

    put("data/state", state)
    put("data/action", action)
    put("data/keypoint", keypoint)
    put("data/n_contacts", np.zeros((n, 1), dtype=np.float32))
    if with_images:
        put("data/img", np.stack([_render(state[i, :2], state[i, 2:]) for i in range(n)]))
    put("meta/episode_ends", ends)

    if zip:
        # Like the real file: the store's root at the zip's root, entries stored uncompressed.
        if path.exists():
            path.unlink()
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for f in sorted(target.rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(target).as_posix())
        shutil.rmtree(target)
    return path


# Config overrides that make the `tiny` config train in a second on a synthetic store (tests only).
SMALL_TRAIN = [
    "policy.down_dims=[16,32]",
    "policy.diffusion_step_embed_dim=16",
    "train.batch_size=8",
    "train.lr_warmup_steps=2",
    "train.log_every=1",
    "train.val_every=3",
    "train.val_batches=2",
    "data.val_ratio=0.25",
]
