"""PushT demonstrations: find and load the zarr replay, split it by episode, cut training windows.

    from dpkit.train.config import load_config
    from dpkit.train.data import load_datasets
    cfg = load_config("tiny")
    train_ds, val_ds = load_datasets(cfg)          # dataset found as described in resolve_dataset_path
    sample = train_ds[0]                           # {"obs": {"obs": (To, 20)}, "action": (H, 2)} float32
    normalizer = train_ds.fit_normalizer()

A window is `H` consecutive steps of one episode. Windows may start up to `To - 1` steps before the
episode's first step and end up to `Ta - 1` steps after its last one; those steps repeat the episode's
first / last frame (the paper's padding). Every window of every episode is one row of a precomputed
index table, so `dataset[i]` is random access and a whole batch is one numpy gather.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpkit.errors import DpkitError
from dpkit.train.config import IMAGE_SIZE, LOWDIM_OBS_DIM, Config, PolicyConfig

ENV_VAR = "DPKIT_PUSHT_DATA"
DATASET_NAME = "pusht_cchi_v7_replay.zarr"
DATASET_URL = "https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip"
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Finding the dataset


class DatasetNotFound(DpkitError):
    """No dataset given and none found in the usual places (dpkit.train.download can fetch it)."""


def _candidates_in(folder: Path) -> list[Path]:
    """Dataset stores directly inside `folder` or one level down (pusht.zip unpacks to pusht/...)."""
    found = []
    for pattern in ("*.zarr", "*.zarr.zip", "*/*.zarr", "*/*.zarr.zip"):
        found += sorted(folder.glob(pattern))
    # Prefer the paper's file name when a folder holds several stores.
    return sorted(found, key=lambda p: (not p.name.startswith(DATASET_NAME), len(p.parts), str(p)))


def _as_store(path: Path) -> Path | None:
    if path.is_dir() and (path.suffix == ".zarr" or (path / ".zgroup").exists() or (path / "zarr.json").exists()):
        return path
    if path.is_file() and path.name.endswith(".zip"):
        return path
    if path.is_dir():
        found = _candidates_in(path)
        return found[0] if found else None
    return None


def resolve_dataset_path(path: str | os.PathLike | None = None) -> Path:
    """The PushT store to read: `path` (--data / data.path), else $DPKIT_PUSHT_DATA, else the first store
    found in `data/pusht/` or `../shared/data/pusht/` (relative to the project root, then to the CWD).

    Each may be a `.zarr` folder, a `.zarr.zip`, or a folder that contains one (also one level down).
    """
    explicit = path if path is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.exists():
            source = "--data / data.path" if path is not None else f"${ENV_VAR}"
            raise DpkitError(f"dataset {p} (from {source}) does not exist")
        store = _as_store(p)
        if store is None:
            raise DpkitError(f"{p} is not a .zarr folder, a .zarr.zip, or a folder containing one")
        return store
    searched = []
    for root in dict.fromkeys([_PROJECT_ROOT, Path.cwd()]):
        for rel in ("data/pusht", "../shared/data/pusht"):
            folder = (root / rel).resolve()
            searched.append(str(folder))
            if folder.is_dir():
                found = _candidates_in(folder)
                if found:
                    return found[0]
    raise DatasetNotFound(
        f"PushT dataset not found: dpkit trains on the PushT demonstrations of Diffusion Policy "
        f"({DATASET_NAME}, 206 episodes), published at {DATASET_URL}; unzip it into data/pusht/ or pass "
        f"--data PATH (a .zarr folder or .zarr.zip) or set ${ENV_VAR} (searched: {', '.join(dict.fromkeys(searched))})"
    )


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Replay:
    """The whole replay in memory: per-step arrays over all episodes, concatenated."""

    path: Path
    episode_ends: np.ndarray  # (E,) int64, end-exclusive
    action: np.ndarray  # (N, 2) float32
    agent_pos: np.ndarray  # (N, 2) float32
    lowdim_obs: np.ndarray | None  # (N, 20) float32: 9 keypoints then agent position
    image: np.ndarray | None  # (N, 96, 96, 3) uint8

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1])

    def episode_bounds(self, e: int) -> tuple[int, int]:
        return (int(self.episode_ends[e - 1]) if e > 0 else 0), int(self.episode_ends[e])


def _open_group(path: Path):
    import zarr

    try:
        if path.is_file():
            store = zarr.storage.ZipStore(path, mode="r")
            return zarr.open_group(store, mode="r")
        return zarr.open_group(str(path), mode="r")
    except Exception as e:  # zarr raises several types for "not a zarr store"
        raise DpkitError(f"cannot open {path} as a zarr store: {_cause(e)}") from None


def _cause(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _array(group, key: str, path: Path):
    try:
        arr = group[key]
    except KeyError:
        raise DpkitError(f"{path}: array {key!r} is missing (expected the PushT replay layout)") from None
    except Exception as e:  # damaged metadata (.zarray), a bad CRC in a zip member
        raise DpkitError(f"dataset {path}: cannot open {key}: {_cause(e)}") from None
    dtype = getattr(arr, "dtype", None)
    if dtype is None or not hasattr(arr, "shape"):  # a group stored where the layout has an array
        kind = type(arr).__name__.lower()
        raise DpkitError(f"{path}: {key} is a {kind}, expected an array (the PushT replay layout)")
    if np.dtype(dtype).kind not in "biuf":
        raise DpkitError(f"{path}: {key} has dtype {dtype}, expected numbers (the PushT replay layout)")
    return arr


def _chunk_key(arr, coords: tuple[int, ...]) -> str:
    try:
        return arr.metadata.encode_chunk_key(coords)  # zarr 3 ("0.0" for the replay's zarr 2 arrays)
    except AttributeError:
        return ".".join(map(str, coords))


def _read(arr, key: str, path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Steps start:stop of `arr` as numpy. A damaged chunk (bad compressed bytes, a bad CRC in a zip)
    becomes one DpkitError naming the dataset, the array and the first chunk that fails on its own."""
    stop = arr.shape[0] if stop is None else stop
    try:
        return np.asarray(arr[start:stop])
    except Exception as e:
        cause, where = e, ""
        rows = max(int(arr.chunks[0]), 1)
        first, last = start // rows, max(stop - 1, start) // rows
        for c in np.ndindex(last - first + 1, *arr.cdata_shape[1:]):
            coords = (first + c[0], *c[1:])
            try:
                arr.get_block_selection(coords)
            except Exception as chunk_error:
                cause, where = chunk_error, f" (chunk {_chunk_key(arr, coords)})"
                break
        raise DpkitError(
            f"dataset {path}: cannot read {key}{where}: {_cause(cause)} (damaged? replace the dataset)"
        ) from None


def _images_uint8(arr, n: int, path: Path) -> np.ndarray:
    """Stored as float32 0-255 (2.8 GB for the real replay): convert one chunk at a time."""
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    step = max(int(arr.chunks[0]), 1)
    for s in range(0, n, step):
        block = _read(arr, "data/img", path, s, min(s + step, n))
        if block.dtype == np.uint8:
            out[s : s + len(block)] = block
        else:
            out[s : s + len(block)] = np.clip(np.rint(block), 0, 255).astype(np.uint8)
    return out


def load_replay(path: str | os.PathLike, obs_mode: str) -> Replay:
    """Read and validate the arrays `obs_mode` needs ("image" or "lowdim")."""
    path = Path(path)
    group = _open_group(path)
    ends = _read(_array(group, "meta/episode_ends", path), "meta/episode_ends", path).astype(np.int64)
    if ends.ndim != 1 or len(ends) == 0:
        raise DpkitError(f"{path}: meta/episode_ends must be a non-empty 1-D array, got shape {ends.shape}")
    if ends[0] <= 0 or np.any(np.diff(ends) <= 0):
        raise DpkitError(f"{path}: meta/episode_ends must be strictly increasing and positive (empty episode?)")
    n = int(ends[-1])

    def read(key: str, shape: tuple[int, ...]) -> object:
        arr = _array(group, key, path)
        if tuple(arr.shape[1:]) != shape:
            raise DpkitError(f"{path}: {key} has shape {tuple(arr.shape)}, expected (N, {', '.join(map(str, shape))})")
        if arr.shape[0] != n:
            raise DpkitError(
                f"{path}: {key} has {arr.shape[0]} steps but meta/episode_ends ends at {n} (mismatched array lengths)"
            )
        return arr

    action = _read(read("data/action", (2,)), "data/action", path).astype(np.float32, copy=False)
    state = _read(read("data/state", (5,)), "data/state", path).astype(np.float32, copy=False)
    agent_pos = np.ascontiguousarray(state[:, :2])
    lowdim = image = None
    if obs_mode == "lowdim":
        kp = _read(read("data/keypoint", (9, 2)), "data/keypoint", path).astype(np.float32, copy=False)
        lowdim = np.concatenate([kp.reshape(n, 18), agent_pos], axis=1)
        assert lowdim.shape[1] == LOWDIM_OBS_DIM
    elif obs_mode == "image":
        image = _images_uint8(read("data/img", (IMAGE_SIZE, IMAGE_SIZE, 3)), n, path)
    else:
        raise DpkitError(f"unknown obs_mode {obs_mode!r}")
    for name, a in (("data/action", action), ("data/state", state), ("data/keypoint", lowdim)):
        if a is not None and not np.all(np.isfinite(a)):
            raise DpkitError(f"{path}: {name} contains NaN or infinite values")
    return Replay(path=path, episode_ends=ends, action=action, agent_pos=agent_pos, lowdim_obs=lowdim, image=image)


# --------------------------------------------------------------------------------------------------
# Split and windows


def split_episodes(
    n_episodes: int, val_ratio: float, seed: int, max_train_episodes: int | None = None, method: str = "dpkit"
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) episode ids, sorted. Val gets round(n * val_ratio) episodes (at least 1 when
    val_ratio > 0, never all); max_train_episodes then subsamples the rest. Deterministic in `seed`.

    method "dpkit": one generator permutes the episodes, val is the first n_val, the subsample draws
    from the same generator. method "original": the original diffusion_policy's choice for the same
    seed — val is drawn without replacement by a generator seeded `seed`, then a second generator with
    the same seed draws positions among the remaining episodes (in id order) for the training subset.
    """
    n_val = 0
    if val_ratio > 0 and n_episodes > 1:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    if method == "original":
        val = np.random.default_rng(seed).choice(n_episodes, size=n_val, replace=False)
        train = np.setdiff1d(np.arange(n_episodes), val)
        if max_train_episodes is not None and len(train) > max_train_episodes:
            train = train[np.random.default_rng(seed).choice(len(train), size=max_train_episodes, replace=False)]
    elif method == "dpkit":
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n_episodes)
        val, train = perm[:n_val], perm[n_val:]
        if max_train_episodes is not None and len(train) > max_train_episodes:
            train = rng.choice(train, size=max_train_episodes, replace=False)
    else:
        raise DpkitError(f"unknown split method {method!r} (expected 'dpkit' or 'original')")
    return np.sort(train).astype(np.int64), np.sort(val).astype(np.int64)


def window_index(
    episode_ends: np.ndarray, episodes: np.ndarray, horizon: int, pad_before: int, pad_after: int
) -> np.ndarray:
    """(M, 3) int64 rows (window_start, episode_start, episode_end) in global step numbers.

    Step t of a window reads frame clip(window_start + t, episode_start, episode_end - 1): that clamp
    is the padding. An episode of length L yields L + pad_before + pad_after - horizon + 1 windows
    (none if that is <= 0), as in the original's create_indices; pads are capped at horizon - 1 there too.
    """
    pad_before = min(max(pad_before, 0), horizon - 1)
    pad_after = min(max(pad_after, 0), horizon - 1)
    rows = []
    for e in episodes:
        start = int(episode_ends[e - 1]) if e > 0 else 0
        end = int(episode_ends[e])
        first, last = start - pad_before, end - horizon + pad_after  # inclusive range of window starts
        if last < first:
            continue
        ws = np.arange(first, last + 1, dtype=np.int64)
        rows.append(np.stack([ws, np.full_like(ws, start), np.full_like(ws, end)], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)


class PushTDataset(torch.utils.data.Dataset):
    """Windows of some episodes of a Replay.

    `ds[i]` -> {"obs": {...}, "action": (H, 2)} float32 numpy arrays, obs being {"obs": (To, 20)} in
    low-dim mode or {"image": (To, 3, 96, 96) in [0, 1], "agent_pos": (To, 2)} in image mode; raw
    (unnormalized) units, keyed like DiffusionPolicy's observations. `ds.__getitems__(indices)` returns the same with a leading batch axis, in one gather; the
    DataLoader uses it with `collate_fn=to_tensors`.
    """

    def __init__(self, replay: Replay, episodes: np.ndarray, policy: PolicyConfig):
        self.replay = replay
        self.episodes = np.asarray(episodes, dtype=np.int64)
        self.obs_mode = policy.obs_mode
        self.n_obs_steps = policy.n_obs_steps
        self.horizon = policy.horizon
        self.pad_before = policy.n_obs_steps - 1
        self.pad_after = policy.n_action_steps - 1
        self.index = window_index(replay.episode_ends, self.episodes, self.horizon, self.pad_before, self.pad_after)

    def __len__(self) -> int:
        return len(self.index)

    def frames(self, indices) -> np.ndarray:
        """(B, H) global frame numbers of the windows `indices`, padding applied."""
        rows = self.index[np.asarray(indices, dtype=np.int64)]
        t = rows[:, :1] + np.arange(self.horizon)
        return np.clip(t, rows[:, 1:2], rows[:, 2:3] - 1)

    def __getitems__(self, indices) -> dict:
        frames = self.frames(indices)
        obs_frames = frames[:, : self.n_obs_steps]
        r = self.replay
        if self.obs_mode == "lowdim":
            obs = {"obs": r.lowdim_obs[obs_frames]}
        else:
            img = r.image[obs_frames]  # (B, To, 96, 96, 3) uint8
            img = np.ascontiguousarray(img.transpose(0, 1, 4, 2, 3)).astype(np.float32) / np.float32(255)
            obs = {"image": img, "agent_pos": r.agent_pos[obs_frames]}
        return {"obs": obs, "action": r.action[frames]}

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        batch = self.__getitems__([i % len(self)])
        return _map(batch, lambda a: a[0])

    def fit_normalizer(self, episodes: np.ndarray | None = None):
        """A Normalizer fitted on every step of `episodes` (default: this dataset's, i.e. the training
        split; data.normalizer_episodes=all passes every episode, as the original does)."""
        from dpkit.train.normalizer import Normalizer

        episodes = self.episodes if episodes is None else episodes
        steps = np.concatenate([np.arange(*self.replay.episode_bounds(e)) for e in episodes])
        data = {"action": self.replay.action[steps]}
        if self.obs_mode == "lowdim":
            data["obs"] = self.replay.lowdim_obs[steps]
        else:
            data["agent_pos"] = self.replay.agent_pos[steps]
        return Normalizer.fit(data)


def fit_normalizer(cfg: Config, train_ds: "PushTDataset"):
    """The run's normalizer: fitted on the training episodes, or on all (data.normalizer_episodes=all)."""
    every = np.arange(train_ds.replay.n_episodes) if cfg.data.normalizer_episodes == "all" else None
    return train_ds.fit_normalizer(every)


def _map(tree, fn):
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def to_tensors(batch: dict) -> dict:
    """DataLoader collate_fn for batches made by PushTDataset.__getitems__."""
    return _map(batch, torch.from_numpy)


def load_datasets(cfg: Config, data_path: str | os.PathLike | None = None) -> tuple[PushTDataset, PushTDataset]:
    """(train, val) datasets for `cfg`, split by episode (`cfg.data`); val may be empty."""
    path = resolve_dataset_path(data_path if data_path is not None else cfg.data.path)
    replay = load_replay(path, cfg.policy.obs_mode)
    d = cfg.data
    train_eps, val_eps = split_episodes(replay.n_episodes, d.val_ratio, d.split_seed, d.max_train_episodes, d.split)
    train = PushTDataset(replay, train_eps, cfg.policy)
    if len(train) == 0:
        raise DpkitError(f"{path}: no training windows (episodes shorter than the horizon {cfg.policy.horizon}?)")
    return train, PushTDataset(replay, val_eps, cfg.policy)
