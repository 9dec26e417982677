"""Bounds on everything read from outside (issue 21): checkpoint pickles, JSON and YAML, the dataset download.

- A `.ckpt` whose tensor record is a broadcast view (stride 0 over 2**33 values, written by torch.save
  itself), negative strides, views past or overlapping their storage, and more bytes than the per-file
  cap are refused before anything is allocated.
- A pickle nested 200k deep, a config.json / state.json nested 100k deep and a YAML config nested 100k
  deep are one line each, not a RecursionError.
- A server that trickles bytes hits the minimum rate or the deadline; a second fetch into the same folder
  downloads nothing, and --force downloads again.
"""

from __future__ import annotations

import collections
import io
import http.server
import pickle
import threading
import time
import zipfile
from pathlib import Path

import pytest
from cli_helpers import refused
import torch

from dpkit.convert import unpickle
from dpkit.convert.cli import main as convert_main
from dpkit.convert.unpickle import load_torch_zip, loads_plain
from dpkit.errors import DpkitError, InputError
from dpkit.train import checkpoint as ckpt_mod
from dpkit.train import data as data_mod
from dpkit.train import download as dl
from dpkit.train.config import load_config
from dpkit.train.data import DATASET_NAME
from synthetic import make_synthetic_pusht

DEEP_PICKLE = 200_000
DEEP_JSON = 100_000


def _one_line_refusal(capsys, argv: list[str], *needles: str) -> str:
    return refused(convert_main, capsys, [*argv, "--no-progress"], *needles)


# --------------------------------------------------------------------------------------------------
# Tensor records


class _Storage:
    """Pickled as a persistent id, as torch.save writes a storage."""


class _Record:
    """Pickles as torch's own tensor record, with whatever offset/size/stride the test gives."""

    def __init__(self, offset, size, stride):
        self.args = (offset, tuple(size), tuple(stride))

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Storage(), *self.args, False, collections.OrderedDict())


def _write_ckpt(path: Path, offset, size, stride, numel: int = 4) -> Path:
    """A torch zip archive (archive/data.pkl + archive/data/0) holding {"w": <the record>} over `numel` floats."""

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, _Storage) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": _Record(offset, size, stride)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", torch.arange(numel, dtype=torch.float32).numpy().tobytes())
    return path


def test_the_crafted_record_is_read_when_sound(tmp_path):
    got = load_torch_zip(_write_ckpt(tmp_path / "ok.ckpt", 1, (3,), (1,)))
    assert torch.equal(got["w"], torch.tensor([1.0, 2.0, 3.0]))
    got = load_torch_zip(_write_ckpt(tmp_path / "t.ckpt", 0, (2, 2), (1, 2)))  # a transposed view is fine
    assert torch.equal(got["w"], torch.tensor([[0.0, 2.0], [1.0, 3.0]]))


def test_a_broadcast_view_saved_by_torch_is_refused_before_allocating(tmp_path):
    path = tmp_path / "stride0.ckpt"
    torch.save({"w": torch.zeros(1).expand(1 << 33)}, path)  # 32 GiB of float32 once clone()d
    assert path.stat().st_size < 4096
    with pytest.raises(InputError, match=r"stride 0.*refused"):
        load_torch_zip(path)


@pytest.mark.parametrize("offset, size, stride, needle", [
    (0, (1 << 40,), (0,), "stride 0"),
    (0, (2,), (-1,), "negative"),
    (-1, (2,), (1,), "negative"),
    (0, (-2,), (1,), "negative"),
    (2, (3,), (1,), "reaches past its storage"),
    (0, (2, 3), (1, 1), "overlapping view"),
])
def test_bad_views_are_refused(tmp_path, offset, size, stride, needle):
    with pytest.raises(InputError, match=needle):
        load_torch_zip(_write_ckpt(tmp_path / "bad.ckpt", offset, size, stride))


def test_the_per_file_byte_cap(tmp_path, monkeypatch):
    path = _write_ckpt(tmp_path / "big.ckpt", 0, (4,), (1,))
    monkeypatch.setattr(unpickle, "MAX_BYTES", 40)  # members ~100 bytes: refused from the zip directory
    with pytest.raises(InputError, match="per-file limit"):
        load_torch_zip(path)
    total = sum(i.file_size for i in zipfile.ZipFile(path).infolist() if "data" in i.filename)
    monkeypatch.setattr(unpickle, "MAX_BYTES", total + 16 + 8)  # members and storage (16 bytes) fit, the clone not
    with pytest.raises(InputError, match="per-file limit"):
        load_torch_zip(path)
    monkeypatch.setattr(unpickle, "MAX_BYTES", total + 32)
    assert load_torch_zip(path)["w"].shape == (4,)


def test_the_default_cap_is_documented():
    assert unpickle.MAX_BYTES == 8 << 30 and "8 GiB" in unpickle.__doc__


# --------------------------------------------------------------------------------------------------
# Depth


def _deep_list_pickle(depth: int) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def test_a_pickle_nested_200k_deep_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(InputError, match="deeper than"):
        loads_plain(_deep_list_pickle(DEEP_PICKLE), "deep")
    path = tmp_path / "deep.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _deep_list_pickle(DEEP_PICKLE))
    _one_line_refusal(capsys, [str(path), "--out", str(tmp_path / "run")], "deep.ckpt", "deeper than")


def test_a_real_depth_still_reads():
    obj = {"a": [[[{"b": (1, 2)}]]]}
    assert loads_plain(pickle.dumps(obj, protocol=2), "x") == obj


def _deep_json(depth: int) -> str:
    return '{"type": "diffusion", "x": ' + "[" * depth + "]" * depth + "}"


def test_a_lerobot_config_nested_100k_deep_is_one_line(tmp_path, capsys):
    src = tmp_path / "lerobot"
    src.mkdir()
    (src / "config.json").write_text(_deep_json(DEEP_JSON))
    _one_line_refusal(capsys, [str(src), "--out", str(tmp_path / "run")], "config.json", "nesting is deeper")


def test_a_state_json_nested_100k_deep_is_one_line(tmp_path):
    ck = tmp_path / "step_00000001"
    ck.mkdir()
    (ck / ckpt_mod.STATE).write_text(_deep_json(DEEP_JSON))
    with pytest.raises(InputError, match="nesting is deeper"):
        ckpt_mod.read_state(ck)


def test_a_policy_json_nested_100k_deep_is_one_line(tmp_path):
    from dpkit.runtime.bundle import limits, load_bundle

    (tmp_path / "policy.json").write_text(_deep_json(DEEP_JSON))
    with pytest.raises(DpkitError, match=f"policy.json: JSON nesting is deeper than {limits()['max_json_depth']} levels"):
        load_bundle(tmp_path)


def test_a_yaml_config_nested_100k_deep_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("train: " + "[" * DEEP_JSON + "]" * DEEP_JSON + "\n")
    with pytest.raises(DpkitError, match="nests too deeply"):
        load_config(str(path))
    with pytest.raises(DpkitError, match="nests its value too deeply"):
        load_config("tiny", ["train.lr=" + "[" * DEEP_JSON + "]" * DEEP_JSON])


# --------------------------------------------------------------------------------------------------
# The download


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Serves `server.payload` (Range honoured), one byte every `server.delay` seconds."""

    def do_GET(self):
        srv = self.server
        srv.requests.append(self.headers.get("Range"))
        body, start = srv.payload, 0
        if (r := self.headers.get("Range", "")).startswith("bytes="):
            start = int(r[len("bytes="):].rstrip("-"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        try:
            if srv.delay == 0:
                self.wfile.write(body[start:])
                return
            for i in range(start, len(body)):
                if srv.stop.is_set():
                    return
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(srv.delay)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def pusht_zip(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("src")
    store = make_synthetic_pusht(root / DATASET_NAME, lengths=[5, 6], with_images=False)
    zpath = root / "pusht.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(store.rglob("*")):
            zf.write(f, "pusht/" + f.relative_to(root).as_posix())
    return zpath.read_bytes()


@pytest.fixture
def server(pusht_zip):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    srv.daemon_threads = True
    srv.payload, srv.delay, srv.requests, srv.stop = pusht_zip, 0, [], threading.Event()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/pusht.zip"
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


def test_a_trickling_server_hits_the_minimum_rate(server, tmp_path):
    server.delay = 0.05  # ~20 bytes/s
    t = time.monotonic()
    with pytest.raises(DpkitError, match=r"too slow: \d+ bytes/s .* below the minimum 1000 bytes/s \(--min-rate\); "
                                         r"run again to resume"):
        dl.download(server.url, tmp_path / "pusht.zip", progress=False, min_rate=1000, rate_window=0.5,
                    retry_wait=0)
    assert time.monotonic() - t < 3
    assert (tmp_path / "pusht.zip.part").stat().st_size > 0  # kept for the next run


def test_the_overall_deadline(server, tmp_path):
    server.delay = 0.01  # ~100 bytes/s: above min_rate, far from done in 1 s
    t = time.monotonic()
    with pytest.raises(DpkitError, match=r"did not finish within the 1 s deadline \(--deadline\)"):
        dl.download(server.url, tmp_path / "pusht.zip", progress=False, deadline=1.0, min_rate=10, rate_window=0.5,
                    retry_wait=0)
    assert time.monotonic() - t < 3


@pytest.mark.parametrize("kw", [{"deadline": 0}, {"deadline": float("nan")}, {"min_rate": -1},
                                {"rate_window": 0}, {"min_rate": True}])
def test_bad_bounds_are_refused(kw, tmp_path):
    with pytest.raises(InputError, match="must be a finite number"):
        dl.download("http://127.0.0.1:1/x", tmp_path / "x", progress=False, **kw)


def test_a_second_fetch_into_the_same_folder_downloads_nothing(server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DPKIT_PUSHT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_mod, "_PROJECT_ROOT", tmp_path)
    dest = tmp_path / "elsewhere"  # not a folder resolve_dataset_path searches
    argv = ["--dest", str(dest), "--url", server.url, "--no-progress"]
    monkeypatch.setattr(dl, "check_arrays", lambda *a: None)  # the synthetic store is not the real replay
    for _ in range(2):
        with pytest.raises(SystemExit) as e:
            dl.main(argv)
        assert e.value.code == 0
        out, err = capsys.readouterr()
        assert out.strip() == str(dest / DATASET_NAME) and "--force" not in err
    assert server.requests == [None]  # the second run downloaded nothing
    marker = dest / DATASET_NAME / "marker"
    marker.write_text("old copy")
    with pytest.raises(SystemExit) as e:
        dl.main([*argv, "--force"])
    assert e.value.code == 0 and server.requests == [None, None]
    assert not marker.exists() and (dest / DATASET_NAME).is_dir()  # replaced by the new download
    assert sorted(p.name for p in dest.iterdir()) == [DATASET_NAME]


def test_download_cli_refuses_bad_bounds_in_one_line(capsys):
    for argv in (["--deadline", "0"], ["--min-rate", "-5"], ["--force", "--data", "x"]):
        with pytest.raises(SystemExit) as e:
            dl.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), err
