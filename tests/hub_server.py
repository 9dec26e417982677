"""A tiny in-process stand-in for the Hugging Face hub's HTTP endpoints, for tests without a network.

    with HubServer({"lerobot/tiny": {"config.json": b"...", ...}}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub")}   # then run dpkit-convert with it

It answers the few requests huggingface_hub's snapshot_download / hf_hub_download make, the way the hub does:
  GET  /api/models/<repo>/revision/<rev>        repo info: {"id", "sha", "siblings"}
  GET  /api/models/<repo>/tree/<rev>[/<path>]   the file listing (one page)
  HEAD|GET /<repo>/resolve/<rev>/<file>         a file, with X-Repo-Commit, ETag and Content-Length
and 404s with the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound). So the cache under
HF_HUB_CACHE is laid out by huggingface_hub itself (blobs/, snapshots/, refs/, its tree listing), never by hand.
`requests` records every request ("GET /api/...") so a test or a measurement can count what went over the wire.

Run as a script, it measures `dpkit-convert <hub id>` with a cold cache, a warm one, and a warm one offline:

    .venv/bin/python tests/hub_server.py [FIXTURE_FOLDER ...]
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def _commit(files: dict[str, bytes], salt: str) -> str:
    h = hashlib.sha1(salt.encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


class HubServer:
    """repos: {repo_id: {filename: bytes}} (one commit each, reachable as "main" or its sha) or
    {repo_id: {revision name: {filename: bytes}}} with the key "@revisions" set to True."""

    def __init__(self, repos: dict[str, dict]):
        self.repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}
        for repo_id, spec in repos.items():
            revs = {k: v for k, v in spec.items() if k != "@revisions"} if spec.get("@revisions") else {"main": spec}
            self.repos[repo_id] = {name: (_commit(files, f"{repo_id}@{name}"), files) for name, files in revs.items()}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server._answer(self, head=True)

            def do_GET(self):
                server._answer(self, head=False)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def commit(self, repo_id: str, revision: str = "main") -> str:
        return self.repos[repo_id][revision][0]

    # --- the hub's answers ------------------------------------------------------------------------------
    def _lookup(self, repo_id: str, rev: str):
        revs = self.repos.get(repo_id)
        if revs is None:
            return "RepoNotFound", None
        for name, (sha, files) in revs.items():
            if rev in (name, sha):
                return None, (sha, files)
        return "RevisionNotFound", None

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(f"{h.command} {path}")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if m:
            err, found = self._lookup(m.group(1), m.group(3))
            if err:
                return self._error(h, err, head)
            sha, files = found
            if m.group(2) == "revision":
                body = {"id": m.group(1), "modelId": m.group(1), "sha": sha, "private": False,
                        "siblings": [{"rfilename": f} for f in sorted(files)]}
            else:
                body = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in sorted(files.items())]
            return self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            err, found = self._lookup(m.group(1), m.group(2))
            if err:
                return self._error(h, err, head)
            sha, files = found
            if m.group(3) not in files:
                return self._error(h, "EntryNotFound", head)
            data = files[m.group(3)]
            return self._send(h, 200, data, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                             "Content-Type": "application/octet-stream"}, head)
        self._error(h, "RepoNotFound", head)

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(h, 404, body, {"X-Error-Code": code, "X-Error-Message": code,
                                  "Content-Type": "application/json"}, head)


def repo_files(folder: Path) -> dict[str, bytes]:
    """A lerobot folder as the files of a hub repo (an .xz weights file decompressed, as the tests do)."""
    import lzma

    files = {}
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and f.suffix != ".xz":
            files[f.name] = f.read_bytes()
        elif f.is_file():
            files[f.name[:-3]] = lzma.decompress(f.read_bytes())
    return files


# huggingface_hub's modules imported before the clock starts (0.3-0.4 s here, the same cold or warm)
FETCH = ("import sys, time; from dpkit.convert.hub import fetch_repo; import huggingface_hub.errors, "
         "huggingface_hub.utils; from huggingface_hub import snapshot_download; t = time.perf_counter(); "
         "fetch_repo(sys.argv[1], progress=False); print(time.perf_counter() - t)")


def _measure(folders: list[Path], repeats: int = 3) -> None:
    """Per fixture, `repeats` times with a fresh cache: the fetch alone (fetch_repo in a child process, its
    imports not counted) and the whole `dpkit-convert <id>` command, cold (empty cache), warm (online: the revision is
    asked for, nothing downloaded) and warm with HF_HUB_OFFLINE=1 (nothing sent). Medians."""
    import os
    import statistics
    import subprocess
    import sys
    import tempfile
    import time

    root = Path(__file__).resolve().parents[1]
    modes = [("cold", {}), ("warm", {}), ("warm, HF_HUB_OFFLINE=1", {"HF_HUB_OFFLINE": "1"})]
    for folder in folders:
        files = repo_files(folder)
        mb = sum(len(b) for f, b in files.items() if f.endswith((".json", ".safetensors"))) / 1e6
        fetch: dict[str, list[float]] = {m: [] for m, _ in modes}
        whole: dict[str, list[float]] = {m: [] for m, _ in modes}
        requests: dict[str, int] = {}
        with HubServer({"lerobot/fixture": files}) as hub:
            for r in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
                    env.pop("HF_HUB_OFFLINE", None)
                    env.pop("HF_TOKEN", None)
                    for what in ("fetch", "whole"):
                        env["HF_HUB_CACHE"] = f"{tmp}/{what}"
                        for i, (label, extra) in enumerate(modes):
                            n0 = len(hub.requests)
                            t0 = time.perf_counter()
                            if what == "fetch":
                                out = subprocess.run([sys.executable, "-c", FETCH, "lerobot/fixture"], cwd=root,
                                                     env={**env, **extra}, check=True, capture_output=True, text=True)
                                fetch[label].append(float(out.stdout.strip().splitlines()[-1]))
                            else:
                                subprocess.run([sys.executable, "-m", "dpkit.convert.cli", "lerobot/fixture", "--out",
                                                f"{tmp}/run{i}", "--no-progress"], env={**env, **extra}, check=True,
                                               cwd=root, stdout=subprocess.DEVNULL)
                                whole[label].append(time.perf_counter() - t0)
                            requests[label] = len(hub.requests) - n0
        print(f"{folder.name}: {mb:.2f} MB fetched (top-level json + safetensors), median of {repeats}")
        for label, _ in modes:
            print(f"  {label:<24} fetch {statistics.median(fetch[label]):7.3f} s   whole dpkit-convert "
                  f"{statistics.median(whole[label]):6.2f} s   {requests[label]:2d} HTTP requests")


if __name__ == "__main__":
    import sys

    here = Path(__file__).resolve().parent
    _measure([Path(a) for a in sys.argv[1:]] or [here / "data" / "peers" / "lerobot_keypoints_ngroups4_ddpm50"])
