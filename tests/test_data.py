"""The PushT data: dataset discovery, validation, padded windows, index table, episode split."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from dpkit.errors import DpkitError
from dpkit.train.config import load_config
from dpkit.train.data import (
    PushTDataset,
    fit_normalizer,
    load_datasets,
    load_replay,
    resolve_dataset_path,
    split_episodes,
    window_index,
)
from synthetic import make_synthetic_pusht

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "pusht" / "pusht_cchi_v7_replay.zarr.zip"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_synthetic_pusht(tmp_path_factory.mktemp("data") / "pusht.zarr", lengths=[12, 20, 7, 15])


def _policy(**kw):
    return load_config("tiny", [f"policy.{k}={v}" for k, v in kw.items()]).policy


@pytest.mark.parametrize("horizon,to,ta", [(16, 2, 8), (10, 2, 8), (10, 3, 4), (16, 1, 1)])
def test_index_table_length_matches_original_formula(store, horizon, to, ta):
    replay = load_replay(store, "lowdim")
    ds = PushTDataset(replay, np.arange(replay.n_episodes), _policy(horizon=horizon, n_obs_steps=to, n_action_steps=ta))
    lengths = np.diff(np.concatenate([[0], replay.episode_ends]))
    pad_before, pad_after = min(to - 1, horizon - 1), min(ta - 1, horizon - 1)
    expected = sum(max(0, L + pad_before + pad_after - horizon + 1) for L in lengths)
    assert len(ds) == expected
    # The 7-step episode yields no window at H=16, To=2, Ta=8 (7 + 1 + 7 - 16 + 1 = 0).
    if (horizon, to, ta) == (16, 2, 8):
        assert not np.any(ds.index[:, 1] == 32)


def test_windows_repeat_first_and_last_frame_exactly(store):
    replay = load_replay(store, "lowdim")
    pol = _policy(horizon=10)  # To=2, Ta=8: pad_before 1, pad_after 7
    ds = PushTDataset(replay, np.array([1]), pol)  # episode 1 holds global steps 12..31
    s, e = 12, 32
    assert len(ds) == 20 + 1 + 7 - 10 + 1
    first, last = ds[0], ds[len(ds) - 1]
    # First window starts one step before the episode: frame s twice, then s+1 ...
    np.testing.assert_array_equal(first["action"], replay.action[[s, s, s + 1, s + 2, s + 3, s + 4, s + 5, s + 6, s + 7, s + 8]])
    np.testing.assert_array_equal(first["obs"]["obs"], replay.lowdim_obs[[s, s]])
    # Last window ends 7 steps after the last frame: e-3, e-2, e-1 then e-1 repeated.
    np.testing.assert_array_equal(last["action"], replay.action[[e - 3, e - 2, e - 1] + [e - 1] * 7])
    np.testing.assert_array_equal(last["obs"]["obs"], replay.lowdim_obs[[e - 3, e - 2]])
    # Every window stays inside its episode.
    frames = ds.frames(np.arange(len(ds)))
    assert frames.min() == s and frames.max() == e - 1
    # Keypoints then agent position, as the policy's low-dim observation expects.
    np.testing.assert_array_equal(first["obs"]["obs"][0, 18:], replay.agent_pos[s])
    assert first["obs"]["obs"].dtype == np.float32 and first["action"].dtype == np.float32


def test_image_samples_are_chw_in_unit_range_and_match_the_store(store):
    replay = load_replay(store, "image")
    assert replay.image.dtype == np.uint8 and replay.lowdim_obs is None
    ds = PushTDataset(replay, np.arange(4), _policy(obs_mode="image"))
    sample = ds[5]
    assert sample["obs"]["image"].shape == (2, 3, 96, 96) and sample["obs"]["agent_pos"].shape == (2, 2)
    assert sample["obs"]["image"].dtype == np.float32
    frame = ds.frames([5])[0, 0]
    raw = zarr.open_group(str(store), mode="r")["data/img"][frame]
    np.testing.assert_allclose(sample["obs"]["image"][0], np.transpose(raw, (2, 0, 1)) / 255.0, atol=1e-7)
    batch = ds.__getitems__([0, 5, 7])
    np.testing.assert_array_equal(batch["obs"]["image"][1], sample["obs"]["image"])
    np.testing.assert_array_equal(batch["action"][1], sample["action"])


def test_split_is_disjoint_deterministic_and_subsampled():
    train, val = split_episodes(206, 0.02, seed=42)
    assert len(val) == 4 and len(train) == 202 and not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(206))
    train2, val2 = split_episodes(206, 0.02, seed=42)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    other, _ = split_episodes(206, 0.02, seed=1)
    assert not np.array_equal(other, train)
    sub, val3 = split_episodes(206, 0.02, seed=42, max_train_episodes=90)
    np.testing.assert_array_equal(val3, val)
    assert len(sub) == 90 and set(sub) <= set(train)
    assert len(split_episodes(5, 0.0, seed=0)[1]) == 0
    assert len(split_episodes(2, 0.9, seed=0)[0]) == 1  # never every episode in val


def test_original_split_picks_the_original_codes_episodes():
    """data.split=original against the original repository's own functions run on the same arguments
    (tests/data/original_split.json, made by tests/data/make_original_split.py)."""
    cases = json.loads((Path(__file__).parent / "data" / "original_split.json").read_text())["cases"]
    assert len(cases) >= 8
    for c in cases:
        train, val = split_episodes(c["n_episodes"], c["val_ratio"], c["seed"], c["max_train_episodes"], "original")
        assert train.tolist() == c["train"] and val.tolist() == c["val"], c
    ours = split_episodes(206, 0.02, 42, 90)  # the two methods really differ (README: Fidelity to the original code)
    assert ours[0].tolist() != cases[0]["train"]
    with pytest.raises(DpkitError, match="unknown split method 'x'"):
        split_episodes(10, 0.1, 0, None, "x")


def test_normalizer_on_all_episodes_is_the_originals_option(store):
    cfg = load_config("tiny", [f"data.path={store}", "data.val_ratio=0.25", "policy.horizon=10",
                               "data.normalizer_episodes=all"])
    train, _ = load_datasets(cfg)
    norm = fit_normalizer(cfg, train).to_dict()
    np.testing.assert_allclose(norm["action"]["min"], train.replay.action[:].min(0), rtol=1e-6)
    np.testing.assert_allclose(norm["obs"]["max"], train.replay.lowdim_obs[:].max(0), rtol=1e-6)
    default = fit_normalizer(load_config("tiny", [f"data.path={store}", "data.val_ratio=0.25", "policy.horizon=10"]),
                             train).to_dict()
    assert not np.allclose(default["action"]["min"], norm["action"]["min"])  # the option changes something


def test_normalizer_is_fitted_on_training_episodes_only(store):
    cfg = load_config("tiny", [f"data.path={store}", "data.val_ratio=0.25", "policy.horizon=10"])
    train, val = load_datasets(cfg)
    assert len(val.episodes) == 1 and not set(train.episodes) & set(val.episodes)
    norm = train.fit_normalizer().to_dict()
    steps = np.concatenate([np.arange(*train.replay.episode_bounds(e)) for e in train.episodes])
    np.testing.assert_allclose(norm["action"]["min"], train.replay.action[steps].min(0), rtol=1e-6)
    np.testing.assert_allclose(norm["obs"]["max"], train.replay.lowdim_obs[steps].max(0), rtol=1e-6)
    assert not np.allclose(norm["action"]["min"], train.replay.action.min(0))  # val episode not included


def test_zip_and_folder_discovery(tmp_path, monkeypatch):
    zipped = make_synthetic_pusht(tmp_path / "nested" / "pusht" / "x.zarr.zip", zip=True, with_images=False)
    assert resolve_dataset_path(tmp_path / "nested") == zipped  # folder holding pusht/<store>
    assert load_replay(zipped, "lowdim").n_episodes == 4
    monkeypatch.setenv("DPKIT_PUSHT_DATA", str(zipped))
    assert resolve_dataset_path(None) == zipped


def test_missing_dataset_says_what_and_where(tmp_path, monkeypatch):
    with pytest.raises(DpkitError, match="does not exist"):
        resolve_dataset_path(tmp_path / "nope.zarr")
    monkeypatch.delenv("DPKIT_PUSHT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    import dpkit.train.data as data

    monkeypatch.setattr(data, "_PROJECT_ROOT", tmp_path)
    with pytest.raises(DpkitError, match=r"pusht_cchi_v7_replay.*206 episodes.*diffusion-policy\.cs\.columbia\.edu.*--data"):
        resolve_dataset_path(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpkitError, match="not a .zarr folder"):
        resolve_dataset_path(tmp_path / "empty")


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_stores_give_clear_errors(store, tmp_path):
    missing = _copy_store(store, tmp_path / "missing.zarr")
    import shutil

    shutil.rmtree(missing / "data" / "action")
    with pytest.raises(DpkitError, match="'data/action' is missing"):
        load_replay(missing, "lowdim")
    # Images are only needed in image mode.
    no_img = _copy_store(store, tmp_path / "noimg.zarr")
    shutil.rmtree(no_img / "data" / "img")
    assert load_replay(no_img, "lowdim").n_steps == 54
    with pytest.raises(DpkitError, match="'data/img' is missing"):
        load_replay(no_img, "image")

    short = _copy_store(store, tmp_path / "short.zarr")
    g = zarr.open_group(str(short), mode="r+")
    kp = g["data/keypoint"][:-3]
    del g["data/keypoint"]
    g.create_array("data/keypoint", shape=kp.shape, dtype=kp.dtype)[:] = kp
    with pytest.raises(DpkitError, match="data/keypoint has 51 steps.*mismatched"):
        load_replay(short, "lowdim")

    ends = _copy_store(store, tmp_path / "ends.zarr")
    g = zarr.open_group(str(ends), mode="r+")
    g["meta/episode_ends"][:] = np.array([12, 10, 39, 54])
    with pytest.raises(DpkitError, match="strictly increasing"):
        load_replay(ends, "lowdim")

    not_zarr = tmp_path / "junk.zarr"
    not_zarr.mkdir()
    (not_zarr / "hello.txt").write_text("hi")
    with pytest.raises(DpkitError, match="junk.zarr"):
        load_replay(not_zarr, "lowdim")


def test_window_index_rows():
    idx = window_index(np.array([5, 9]), np.array([0, 1]), horizon=4, pad_before=1, pad_after=2)
    # episode 0 (steps 0..4): starts -1..3 ; episode 1 (5..8): starts 4..7
    np.testing.assert_array_equal(idx[:, 0], [-1, 0, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(idx[:, 1], [0] * 5 + [5] * 4)
    np.testing.assert_array_equal(idx[:, 2], [5] * 5 + [9] * 4)


@pytest.mark.dataset
def test_real_dataset():
    if not REAL.parent.is_dir():
        pytest.skip(f"real dataset folder {REAL.parent} absent (../shared not mounted)")
    cfg = load_config("tiny", [f"data.path={REAL.parent}", "data.max_train_episodes=null"])
    train, val = load_datasets(cfg)
    replay = train.replay
    assert replay.n_episodes == 206 and replay.n_steps == 25650
    assert len(val.episodes) == 4 and len(train.episodes) == 202
    lengths = np.diff(np.concatenate([[0], replay.episode_ends]))
    assert lengths.min() == 49 and lengths.max() == 246
    expected = sum(L + 1 + 7 - 16 + 1 for L in lengths[train.episodes])
    assert len(train) == expected
    s = train[len(train) // 2]
    assert s["obs"]["obs"].shape == (2, 20) and s["action"].shape == (16, 2)
    assert 0 < replay.action.min() and replay.action.max() < 520


# --------------------------------------------------------------------------------------------------
# Damaged stores: one DpkitError line naming the dataset, the array and the chunk


def _damage_chunk(store: Path, key: str, chunk: str) -> None:
    """Invert the compressed bytes of one chunk file (its 16-byte Blosc header is kept)."""
    f = store / key / chunk
    raw = bytearray(f.read_bytes())
    raw[16:] = bytes(b ^ 0xFF for b in raw[16:])
    f.write_bytes(bytes(raw))


def _flip_byte_in_zip_member(zip_path: Path, member: str) -> None:
    """Flip one byte of a stored member's data, so only its CRC-32 check can notice."""
    import struct
    import zipfile

    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    raw = bytearray(zip_path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    data_start = info.header_offset + 30 + name_len + extra_len
    assert info.compress_type == zipfile.ZIP_STORED and info.compress_size > 20
    raw[data_start + info.compress_size // 2] ^= 0xFF
    zip_path.write_bytes(bytes(raw))


def _damaged_stores(store: Path, tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (store path, obs_mode, the message loading it must give)."""
    chunk = _copy_store(store, tmp_path / "chunk.zarr")
    _damage_chunk(chunk, "data/action", "1.0")
    img = _copy_store(store, tmp_path / "img.zarr")
    _damage_chunk(img, "data/img", "2.0.0.0")
    crc = make_synthetic_pusht(tmp_path / "crc.zarr.zip", lengths=[12, 20, 7, 15], with_images=False, zip=True)
    _flip_byte_in_zip_member(crc, "data/state/0.0")
    truncated = make_synthetic_pusht(tmp_path / "cut.zarr.zip", lengths=[12, 20, 7, 15], with_images=False, zip=True)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    meta = _copy_store(store, tmp_path / "meta.zarr")
    (meta / "data" / "keypoint" / ".zarray").write_text("{not json")
    return {
        "chunk": (chunk, "lowdim", r"dataset .*chunk\.zarr: cannot read data/action \(chunk 1\.0\): RuntimeError: "
                                   r".*blosc"),
        "image chunk": (img, "image", r"dataset .*img\.zarr: cannot read data/img \(chunk 2\.0\.0\.0\): "),
        "bad CRC": (crc, "lowdim", r"dataset .*crc\.zarr\.zip: cannot read data/state \(chunk 0\.0\): "
                                   r"BadZipFile: Bad CRC-32"),
        "truncated zip": (truncated, "lowdim", r"cannot open .*cut\.zarr\.zip as a zarr store: BadZipFile"),
        "bad metadata": (meta, "lowdim", r"dataset .*meta\.zarr: cannot open data/keypoint: JSONDecodeError"),
    }


def test_damaged_stores_give_one_clear_error(store, tmp_path):
    for name, (path, mode, message) in _damaged_stores(store, tmp_path).items():
        with pytest.raises(DpkitError, match=message) as e:
            load_replay(path, mode)
        assert "\n" not in str(e.value) and len(str(e.value)) < 400, name


def test_damaged_stores_through_dpkit_train(store, tmp_path, capsys):
    from dpkit.train.cli import main

    damaged = _damaged_stores(store, tmp_path)
    cases = {name: (path, message) for name, (path, mode, message) in damaged.items() if mode == "lowdim"}
    not_a_store = tmp_path / "notes"
    not_a_store.mkdir()
    (not_a_store / "readme.txt").write_text("no zarr here")
    cases["not a store"] = (not_a_store, r"notes is not a \.zarr folder, a \.zarr\.zip, or a folder containing one")
    junk = tmp_path / "junk.zarr"
    junk.mkdir()
    (junk / "readme.txt").write_text("no zarr here")
    cases["junk .zarr"] = (junk, r"cannot open .*junk\.zarr as a zarr store")
    for name, (path, message) in cases.items():
        with pytest.raises(SystemExit) as e:
            main(["--config", "tiny", "--data", str(path), "--out", str(tmp_path / "run"), "--steps", "1",
                  "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1, name
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), (name, err)
