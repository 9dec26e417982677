"""Write a recorded observation stream for the example controller from real PushT episodes.

    .venv/bin/python cpp/examples/record_observations.py --out demo_out/pusht_lowdim.stream --episodes 3
    .venv/bin/python cpp/examples/record_observations.py --out demo_out/pusht_image.stream --obs-mode image

Stream format (version 1), everything little-endian:
  line 1   JSON header + "\\n": {"format": "dpkit-obs-stream", "version": 1, "obs_mode": ...,
           "inputs": [{"name": ..., "shape": [...]}, ...], "episodes": [T_0, T_1, ...], "control_hz": 10}
  then     for every step of every episode (episodes back to back), for every input in header order:
           prod(shape) float32 values.
Inputs are what the bundle's encoder takes, in the units the environment gives: lowdim `obs` (20,) =
the 9 block keypoints x0,y0..x8,y8 then agent x,y (pixels); image `image` (3,96,96) in [0,1] and
`agent_pos` (2,).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_bytes

DEFAULT_DATASET = Path(__file__).resolve().parents[3] / "shared/data/pusht/pusht_cchi_v7_replay.zarr.zip"


def write_stream(path: str | Path, obs_mode: str, inputs: dict[str, np.ndarray], episode_lengths: list[int],
                 control_hz: float = 10.0) -> None:
    """inputs: name -> (sum(episode_lengths), *shape) arrays, in the encoder's input order."""
    total = sum(episode_lengths)
    header = {"format": "dpkit-obs-stream", "version": 1, "obs_mode": obs_mode,
              "inputs": [{"name": k, "shape": list(v.shape[1:])} for k, v in inputs.items()],
              "episodes": [int(n) for n in episode_lengths], "control_hz": control_hz}
    for k, v in inputs.items():
        if v.shape[0] != total:
            raise DpkitError(f"input {k} has {v.shape[0]} steps, episodes sum to {total}")
    flat = [np.ascontiguousarray(v, dtype="<f4").reshape(total, -1) for v in inputs.values()]
    body = np.concatenate(flat, axis=1).tobytes()  # per step, inputs back to back
    atomic_write_bytes(path, (json.dumps(header) + "\n").encode() + body)


def read_pusht(dataset: Path, episodes: int, obs_mode: str) -> tuple[dict[str, np.ndarray], list[int]]:
    import zarr

    if not dataset.exists():
        raise DpkitError(f"dataset not found: {dataset}")
    store = zarr.storage.ZipStore(str(dataset), mode="r") if dataset.suffix == ".zip" else str(dataset)
    root = zarr.open_group(store, mode="r")
    ends = np.asarray(root["meta/episode_ends"][:])
    if not 1 <= episodes <= len(ends):
        raise DpkitError(f"--episodes must be in [1, {len(ends)}]")
    stop = int(ends[episodes - 1])
    lengths = np.diff(np.concatenate([[0], ends[:episodes]])).tolist()
    state = np.asarray(root["data/state"][:stop], dtype=np.float32)
    if obs_mode == "lowdim":
        kp = np.asarray(root["data/keypoint"][:stop], dtype=np.float32).reshape(stop, 18)
        return {"obs": np.concatenate([kp, state[:, :2]], axis=1)}, lengths
    img = np.asarray(root["data/img"][:stop], dtype=np.float32)  # (T, 96, 96, 3) in 0..255
    return {"image": img.transpose(0, 3, 1, 2) / 255.0, "agent_pos": state[:, :2]}, lengths


@cli_entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Record PushT observations for the example controller.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    ap.add_argument("--episodes", type=int, default=3, help="the first N episodes")
    ap.add_argument("--obs-mode", choices=["lowdim", "image"], default="lowdim")
    args = ap.parse_args(argv)
    inputs, lengths = read_pusht(args.dataset, args.episodes, args.obs_mode)
    write_stream(args.out, args.obs_mode, inputs, lengths)
    print(f"wrote {args.out}: {len(lengths)} episodes, {sum(lengths)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
