"""Fetching the dataset on a fresh machine: progress, resume, checksums, atomic extraction, offline.

Every download here goes to an HTTP server on 127.0.0.1 started by the test; it serves a small zip laid
out like the official pusht.zip (pusht/pusht_cchi_v7_replay.zarr/...) made from a synthetic store.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from dpkit.errors import DpkitError
from dpkit.train import data as data_mod
from dpkit.train import download as dl
from dpkit.train.data import DATASET_NAME, load_replay
from synthetic import make_synthetic_pusht


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.payload` at any path, honouring `Range: bytes=N-` unless mode is "no_range".

    Modes: "normal"; "missing" (404); "corrupt" (one byte of the body differs); "drop_once" (the first response stops
    halfway and the connection closes); "no_range" (always the whole file with 200)."""

    def do_GET(self):
        srv = self.server
        if srv.mode == "missing":
            self.send_error(404)
            return
        body, status, start = srv.payload, 200, 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        srv.requests.append(self.headers.get("Range"))
        if m and srv.mode != "no_range":
            start, status = int(m.group(1)), 206
            if start >= len(body):
                self.send_error(416)
                return
        if srv.mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        chunk = body[start:]
        if srv.mode == "drop_once" and not srv.dropped:
            srv.dropped = True
            chunk = chunk[: len(chunk) // 2]
        self.wfile.write(chunk)  # HTTP/1.0: the connection closes after the response

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served_zip(tmp_path_factory) -> tuple[bytes, dict]:
    """(zip bytes in the official layout, the store's array digests)."""
    root = tmp_path_factory.mktemp("src")
    store = make_synthetic_pusht(root / DATASET_NAME, lengths=[12, 20, 7, 15], with_images=False)
    zpath = root / "pusht.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(store.rglob("*")):
            zf.write(f, "pusht/" + f.relative_to(root).as_posix())
    return zpath.read_bytes(), dl.array_digests(store)


@pytest.fixture
def server(served_zip):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.payload, srv.mode, srv.dropped, srv.requests = served_zip[0], "normal", False, []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/data/training/pusht.zip"
    yield srv
    srv.shutdown()
    srv.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fetch(server, dest: Path, **kw) -> Path:
    kw.setdefault("zip_sha256", _sha(server.payload))
    kw.setdefault("arrays", None)  # the synthetic store is not the real replay
    return dl.fetch_pusht(dest, url=server.url, retry_wait=0, timeout=5, **kw)


def test_download_extracts_the_store_with_progress(server, served_zip, tmp_path, capsys):
    dest = tmp_path / "data" / "pusht"
    store = _fetch(server, dest, arrays=served_zip[1])
    assert store == dest / DATASET_NAME and store.is_dir()
    assert load_replay(store, "lowdim").n_episodes == 4
    assert sorted(p.name for p in dest.iterdir()) == [DATASET_NAME]  # no zip, .part or temp folder left
    err = capsys.readouterr().err
    assert "pusht.zip" in err and "100%" in err  # the tqdm bar
    assert server.requests == [None]
    # resolve_dataset_path finds it where the trainer looks.
    assert data_mod.resolve_dataset_path(dest) == store


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    server.mode = "corrupt"
    dest = tmp_path / "pusht"
    with pytest.raises(DpkitError, match=r"sha256 [0-9a-f]{64} does not match the expected .*deleted"):
        _fetch(server, dest)
    assert list(dest.iterdir()) == []


def test_wrong_content_leaves_nothing(server, served_zip, tmp_path):
    arrays = dict(served_zip[1])
    shape, dtype, _ = arrays["data/action"]
    arrays["data/action"] = (shape, dtype, "0" * 64)
    dest = tmp_path / "pusht"
    with pytest.raises(DpkitError, match=r"data/action is not the expected PushT data"):
        _fetch(server, dest, zip_sha256=None, arrays=arrays)
    assert list(dest.iterdir()) == []


def test_dropped_connection_resumes_with_range(server, served_zip, tmp_path, capsys):
    server.mode = "drop_once"
    store = _fetch(server, tmp_path / "pusht", arrays=served_zip[1])
    half = len(server.payload) // 2
    assert server.requests == [None, f"bytes={half}-"]
    assert load_replay(store, "lowdim").n_steps == 54
    assert f"connection closed after {half} of {len(server.payload)} bytes" in capsys.readouterr().err


def test_part_file_resumes_across_runs(server, tmp_path):
    dest = tmp_path / "pusht"
    dest.mkdir()
    (dest / "pusht.zip.part").write_bytes(server.payload[:1000])  # an earlier run stopped here
    _fetch(server, dest)
    assert server.requests == ["bytes=1000-"] and (dest / DATASET_NAME).is_dir()


def test_server_without_range_restarts(server, tmp_path):
    server.mode = "no_range"
    dest = tmp_path / "pusht"
    dest.mkdir()
    (dest / "pusht.zip.part").write_bytes(b"x" * 500)  # appending the full body to it would fail the checksum
    store = _fetch(server, dest)
    assert server.requests == ["bytes=500-"] and load_replay(store, "lowdim").n_episodes == 4


def test_too_many_drops_keep_the_part_for_later(server, tmp_path):
    server.mode = "drop_once"
    dest = tmp_path / "pusht"
    with pytest.raises(DpkitError, match=r"failed 1 times .*run again to resume from .*pusht\.zip\.part"):
        _fetch(server, dest, retries=0)
    assert (dest / "pusht.zip.part").stat().st_size == len(server.payload) // 2


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/pusht.zip"  # nothing listens there any more


def _no_local_dataset(monkeypatch, tmp_path):
    monkeypatch.delenv("DPKIT_PUSHT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_mod, "_PROJECT_ROOT", tmp_path)


def test_offline_gives_the_not_found_message(monkeypatch, tmp_path):
    _no_local_dataset(monkeypatch, tmp_path)
    with pytest.raises(DpkitError) as e:
        dl.find_or_download(None, dest_dir=tmp_path / "data" / "pusht", url=_refused_url(), timeout=2)
    msg = str(e.value)
    assert re.search(r"PushT dataset not found: .*pusht_cchi_v7_replay.*--data PATH", msg)
    assert re.search(r"; cannot reach http://127\.0\.0\.1:\d+/pusht\.zip: .*Connection refused", msg)
    assert "\n" not in msg and not list((tmp_path / "data" / "pusht").glob("*"))


def test_find_or_download_uses_a_found_dataset_and_downloads_only_when_none(server, served_zip, monkeypatch, tmp_path):
    _no_local_dataset(monkeypatch, tmp_path)
    dest = tmp_path / "data" / "pusht"
    got = dl.find_or_download(None, dest_dir=dest, url=server.url, arrays=served_zip[1], retry_wait=0, progress=False)
    assert got == dest / DATASET_NAME and server.requests == [None]
    assert dl.find_or_download(None, dest_dir=dest, url=server.url) == got and server.requests == [None]
    with pytest.raises(DpkitError, match="does not exist"):  # an explicit path is never replaced by a download
        dl.find_or_download(tmp_path / "missing.zarr", dest_dir=dest, url=server.url)


def test_no_download_outside_loopback_under_pytest(monkeypatch, tmp_path):
    _no_local_dataset(monkeypatch, tmp_path)
    with pytest.raises(DpkitError, match=r"PushT dataset not found.*downloads are disabled \(pytest is running\)"):
        dl.find_or_download(None, dest_dir=tmp_path / "d")  # the official URL: refused before any connection
    with pytest.raises(DpkitError, match=r"downloads are disabled"):
        dl.fetch_pusht(tmp_path / "d", url="http://192.0.2.1/pusht.zip")
    assert not (tmp_path / "d").exists()


def test_zip_without_the_store_or_with_unsafe_paths(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("other/readme.txt", "hi")
    with pytest.raises(DpkitError, match="holds no pusht_cchi_v7_replay.zarr folder"):
        dl.extract_store(bad, tmp_path / "out")
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr(f"pusht/{DATASET_NAME}/../../evil.txt", "x")
    with pytest.raises(DpkitError, match="unsafe member path"):
        dl.extract_store(bad, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not list((tmp_path / "out").glob("*"))


@pytest.mark.dataset
def test_reference_digests_match_the_real_dataset(real_dataset):
    small = [k for k in dl.PUSHT_ARRAYS if k != "data/img"]  # data/img (2.8 GB decoded) takes ~8 s
    assert dl.array_digests(real_dataset, small) == {k: dl.PUSHT_ARRAYS[k] for k in small}


def test_demo_without_a_dataset_gives_one_line(monkeypatch, tmp_path, capsys):
    from dpkit import demo

    _no_local_dataset(monkeypatch, tmp_path)
    for extra in ([], ["--no-download"]):
        with pytest.raises(SystemExit) as e:
            demo.main(["--out", str(tmp_path / "demo_out"), "--train-seconds", "1", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 1 and "PushT dataset not found" in err, err
        assert ("downloads are disabled" in err) == (not extra)
    assert not (tmp_path / "data").exists()


def test_a_part_longer_than_the_file_starts_over(server, tmp_path):
    dest = tmp_path / "pusht"
    dest.mkdir()
    (dest / "pusht.zip.part").write_bytes(server.payload + b"junk")  # the server answers 416
    _fetch(server, dest)
    assert server.requests == [f"bytes={len(server.payload) + 4}-", None] and (dest / DATASET_NAME).is_dir()


def test_http_errors_and_a_bad_zip_are_one_line(server, tmp_path):
    server.mode = "missing"
    with pytest.raises(DpkitError, match=r"cannot download http://127\.0\.0\.1:\d+/data/training/pusht\.zip: HTTP 404"):
        _fetch(server, tmp_path / "a")
    assert not list((tmp_path / "a").glob("*"))
    server.mode, server.payload = "normal", b"not a zip"
    with pytest.raises(DpkitError, match=r"pusht\.zip is not a readable zip"):
        _fetch(server, tmp_path / "b")
    assert not list((tmp_path / "b").glob("*"))
