"""Fetch the PushT demonstrations when no copy is found: `make demo` does this on a fresh machine.

    python -m dpkit.train.download          # prints the dataset path; downloads into data/pusht/ if none is found

`find_or_download()` returns the store that `resolve_dataset_path` finds; only when it finds none (no
--data, no $DPKIT_PUSHT_DATA, nothing in data/pusht/ or ../shared/data/pusht/) does it download the
official `pusht.zip` into `data/pusht/` of the project: a progress bar, HTTP Range requests into
`pusht.zip.part` (a dropped connection resumes where it stopped, also across runs; a server that ignores
Range restarts the file), then the checksum. It extracts the `pusht_cchi_v7_replay.zarr` folder into a
temp folder beside its final place, checks its arrays there, renames it into place and deletes the zip.
Offline, the answer is resolve_dataset_path's "not found" message plus the network error.

Checksums. The Diffusion Policy project publishes no checksum of `pusht.zip`, and this project's machines
cannot reach its server to take one, so `PUSHT_ZIP_SHA256` is None and the download is verified by its
content instead: `PUSHT_ARRAYS` holds each array's shape, dtype and the sha256 of its decoded values
(`array_digests`), computed from the copy of the same replay this project was developed with
(`pusht_cchi_v7_replay.zarr.zip`, sha256 3be123de61b3c359aea966c9787087761cc48825feb1ad357d4709cb549a0d27).
That check is independent of how the zip packs or compresses the chunks; it costs a few seconds once.
When a published zip checksum exists, set PUSHT_ZIP_SHA256. Both are parameters of `fetch_pusht`, so tests
use their own.

The .part file is kept after a failed transfer so the next run resumes; a checksum mismatch deletes it
(resuming would only reproduce the bad bytes).

Bounds. A transfer stops with one line (the .part kept for the next run) when it has run longer than
`deadline` seconds in all (DEFAULT_DEADLINE_S, 2 hours; --deadline), or when it received less than `min_rate`
bytes/s over any `rate_window` seconds (DEFAULT_MIN_RATE, 1 KiB/s over 60 s; --min-rate, 0 turns it off), so
a server that trickles a byte a second cannot hold it forever; no data at all for `timeout` seconds is a
dropped connection (retried). A store already in the download folder is used as it is (nothing is
downloaded); --force downloads it again and replaces it. Downloads never run under pytest or with
$DPKIT_NO_DOWNLOAD set, except from a loopback address (the tests' own server).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import ipaddress
import math
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from dpkit.errors import DpkitError, InputError, cli_entry
from dpkit.io import atomic_dir, sha256_file
from dpkit.train import data as _data
from dpkit.train.data import DATASET_NAME, DATASET_URL, DatasetNotFound, resolve_dataset_path

NO_DOWNLOAD_ENV = "DPKIT_NO_DOWNLOAD"
DEFAULT_DEADLINE_S = 2 * 3600.0  # the whole download, retries included
DEFAULT_MIN_RATE = 1024.0  # bytes/s, averaged over DEFAULT_RATE_WINDOW_S
DEFAULT_RATE_WINDOW_S = 60.0

# Not published by the dataset's authors (see the module docstring): the content check below is used.
PUSHT_ZIP_SHA256: str | None = None

# array -> (shape, dtype, sha256 of the values in C order, little-endian), from pusht_cchi_v7_replay.zarr.zip.
PUSHT_ARRAYS: dict[str, tuple[tuple[int, ...], str, str]] = {
    "meta/episode_ends": ((206,), "int64", "82db02e667c59a83fedb211ab9b84182591b75009df1385210d5235197f93d72"),
    "data/action": ((25650, 2), "float32", "6691b085749144b8db1aede97a80fb380afd08953fcd03660b441d0ffe9d6a8f"),
    "data/state": ((25650, 5), "float32", "dcdc539bfdba9fc01cba8d2fe91cc580539ec046a88b0ffbe91be5511948d4dc"),
    "data/keypoint": ((25650, 9, 2), "float32", "2419980734c1d41050f8fbf7513031e6e784168bafbe42bcec81fdebe44c6611"),
    "data/n_contacts": ((25650, 1), "float32", "3e4258a61c21da4af3257269d3300b5128f04ba3ad34ebd0d0e709489ca854d4"),
    "data/img": ((25650, 96, 96, 3), "float32", "3f7650895d1a500d7162b10475df689731f4fece2b15eaf7d913a560c2a0783d"),
}


class Offline(DpkitError):
    """The server could not be reached at all (no connection, no name resolution)."""


# --------------------------------------------------------------------------------------------------
# One file over HTTP(S): progress, resume, checksum


def _total_size(resp, offset: int) -> int | None:
    """The full file size from a 206's Content-Range or a 200's Content-Length (None if unknown; -1 for
    a 206 that does not start at `offset`)."""
    if resp.status == 206:
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", resp.headers.get("Content-Range", "").strip())
        if m is None or int(m.group(1)) != offset:
            return -1
        return int(m.group(2))
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    *,
    progress: bool = True,
    timeout: float = 30.0,
    retries: int = 5,
    retry_wait: float = 2.0,
    chunk_size: int = 1 << 16,
    deadline: float | None = DEFAULT_DEADLINE_S,
    min_rate: float = DEFAULT_MIN_RATE,
    rate_window: float = DEFAULT_RATE_WINDOW_S,
) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming with Range requests; check `sha256` if given.

    A connection that drops is retried up to `retries` times, each resuming from the bytes already in
    the .part file (which stays for the next run if all fail). A server that ignores Range (200 to a
    ranged request) makes the file start over. `dest` appears only complete and checked.

    The whole call gives up after `deadline` seconds (None: no deadline), and a transfer that receives
    less than `min_rate` bytes/s over `rate_window` seconds (0: no minimum) gives up at once (a slow
    server stays slow); both keep the .part file for the next run.
    """
    _check_bounds(deadline=deadline, min_rate=min_rate, rate_window=rate_window, timeout=timeout)
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    started = time.monotonic()

    def check_deadline() -> None:
        if deadline is not None and time.monotonic() - started > deadline:
            raise DpkitError(f"download of {url} did not finish within the {deadline:g} s deadline (--deadline); "
                             f"run again to resume from {part}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpkitError(f"cannot create {dest.parent}: {e.strerror}") from None
    from tqdm import tqdm

    bar = None
    failures, reached = 0, False
    try:
        while True:
            check_deadline()
            have = part.stat().st_size if part.exists() else 0
            headers = {"User-Agent": "dpkit", **({"Range": f"bytes={have}-"} if have else {})}
            wait = timeout if deadline is None else max(min(timeout, deadline - (time.monotonic() - started)), 0.01)
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=wait) as resp:
                    reached = True
                    total = _total_size(resp, have)
                    if total == -1:
                        part.unlink(missing_ok=True)
                        raise ConnectionError("the server sent a range that was not asked for; starting over")
                    if resp.status != 206:  # the whole file (a server that ignores Range): start over
                        have = 0
                    if bar is None:
                        bar = tqdm(desc=dest.name, total=total, initial=have, unit="B", unit_scale=True,
                                   unit_divisor=1024, file=sys.stderr, disable=not progress, mininterval=0.5)
                    else:
                        bar.reset(total=total)
                        bar.update(have)
                    with open(part, "ab" if have else "wb") as f:
                        window_start, window_bytes = time.monotonic(), 0
                        # read1: whatever has arrived (read() would wait for a whole chunk, unbounded in time
                        # on a server that trickles bytes); each wait for data is bounded by the socket timeout.
                        while block := resp.read1(chunk_size):
                            f.write(block)
                            bar.update(len(block))
                            check_deadline()
                            window_bytes += len(block)
                            now = time.monotonic()
                            if min_rate > 0 and now - window_start >= rate_window:
                                rate = window_bytes / (now - window_start)
                                if rate < min_rate:
                                    raise DpkitError(
                                        f"download of {url} is too slow: {rate:.0f} bytes/s over the last "
                                        f"{now - window_start:.0f} s, below the minimum {min_rate:g} bytes/s "
                                        f"(--min-rate); run again to resume from {part}")
                                window_start, window_bytes = now, 0
                    size = part.stat().st_size
                    if total is None or size == total:
                        break
                    raise ConnectionError(f"connection closed after {size} of {total} bytes")
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                if isinstance(e, urllib.error.HTTPError):
                    if e.code != 416 or not have:
                        raise DpkitError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
                    part.unlink()  # longer than the file: not a prefix of it, start over
                    reached, reason = True, "HTTP 416 for the rest of the .part file; starting over"
                if not reached:
                    raise Offline(f"cannot reach {url}: {reason}") from None
                check_deadline()
                failures += 1
                if failures > retries:
                    raise DpkitError(
                        f"download of {url} failed {failures} times ({reason}); run again to resume from {part}"
                    ) from None
                print(f"\n{dest.name}: {reason}; resuming in {retry_wait:g} s", file=sys.stderr, flush=True)
                if deadline is not None:
                    time.sleep(max(min(retry_wait, deadline - (time.monotonic() - started)), 0))
                else:
                    time.sleep(retry_wait)
    finally:
        if bar is not None:
            bar.close()
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256.lower():
            part.unlink()
            raise DpkitError(f"{url}: sha256 {got} does not match the expected {sha256}; the download was deleted")
    os.replace(part, dest)
    return dest


def _check_bounds(**values: float | None) -> None:
    """deadline, rate_window, timeout: positive finite seconds (deadline may be None); min_rate: >= 0."""
    for name, v in values.items():
        if v is None and name == "deadline":
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (v < 0 if name == "min_rate" else v <= 0):
            limit = ">= 0 bytes/s" if name == "min_rate" else "> 0 seconds"
            raise InputError(f"download {name} must be a finite number {limit}, got {v!r}")


# --------------------------------------------------------------------------------------------------
# The store inside the zip: extract atomically, check its content


def array_digests(store: str | os.PathLike, names=None) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """array -> (shape, dtype, sha256 of its values in C order, little-endian), read chunk row by chunk
    row. `names` defaults to the arrays of PUSHT_ARRAYS that the store has."""
    store = Path(store)
    group = _data._open_group(store)
    out = {}
    for name in names if names is not None else PUSHT_ARRAYS:
        if names is None and name not in group:
            continue
        arr = _data._array(group, name, store)
        h, step = hashlib.sha256(), max(int(arr.chunks[0]), 1)
        for s in range(0, arr.shape[0], step):
            block = _data._read(arr, name, store, s, min(s + step, arr.shape[0]))
            h.update(np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).tobytes())
        out[name] = (tuple(int(d) for d in arr.shape), str(np.dtype(arr.dtype)), h.hexdigest())
    return out


def check_arrays(store: Path, expected: dict[str, tuple[tuple[int, ...], str, str]], source: str) -> None:
    got = array_digests(store, list(expected))
    for name, want in expected.items():
        if got[name] != tuple(want):
            raise DpkitError(
                f"{source}: {name} is not the expected PushT data (shape {got[name][0]}, {got[name][1]}, "
                f"sha256 {got[name][2][:12]}…; expected {tuple(want[0])}, {want[1]}, {want[2][:12]}…)"
            )


def extract_store(zip_path: Path, dest_dir: Path, name: str = DATASET_NAME, arrays=None, force: bool = False) -> Path:
    """Extract the `name` folder of `zip_path` (at any depth: pusht.zip holds pusht/<name>/) to
    `dest_dir/name`, through a temp folder renamed into place once extracted (and checked against
    `arrays`, as in check_arrays). `force` replaces an existing `dest_dir/name`."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DpkitError(f"{zip_path} is not a readable zip: {e}") from None
    with zf:
        members = []
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if name in parts:
                rel = parts[parts.index(name) + 1 :]
                if any(p in ("..", "") or "\\" in p for p in rel):
                    raise DpkitError(f"{zip_path}: unsafe member path {info.filename!r}")
                members.append((info, rel))
        if not members:
            raise DpkitError(f"{zip_path} holds no {name} folder")
        with atomic_dir(dest_dir / name, force=force) as tmp:
            for info, rel in members:
                target = tmp.joinpath(*rel)
                if info.is_dir() or not rel:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
                    raise DpkitError(f"{zip_path}: cannot extract {info.filename}: {e}") from None
            if arrays:
                check_arrays(tmp, arrays, str(zip_path))
    return dest_dir / name


# --------------------------------------------------------------------------------------------------
# The dataset: find it, else fetch it


def default_download_dir() -> Path:
    """data/pusht/ of the project (a source checkout), else of the current folder."""
    root = _data._PROJECT_ROOT
    return (root if (root / "pyproject.toml").is_file() else Path.cwd()) / "data" / "pusht"


def _check_allowed(url: str) -> None:
    """Downloads are off under pytest and with $DPKIT_NO_DOWNLOAD, except from a loopback address."""
    reason = "pytest is running" if os.environ.get("PYTEST_CURRENT_TEST") else None
    if os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"):
        reason = f"${NO_DOWNLOAD_ENV} is set"
    if reason is None:
        return
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Offline(f"not downloading {url}: downloads are disabled ({reason})")


def fetch_pusht(
    dest_dir: str | os.PathLike | None = None,
    url: str = DATASET_URL,
    zip_sha256: str | None = PUSHT_ZIP_SHA256,
    arrays: dict | None = PUSHT_ARRAYS,
    force: bool = False,
    **download_kw,
) -> Path:
    """Download `url` (a zip holding a DATASET_NAME folder) into `dest_dir`, extract and check the store,
    delete the zip; return the store's path. `download_kw` go to `download` (progress, timeout, deadline,
    min_rate, ...). A store already in `dest_dir` (only a complete, checked one is ever put there) is
    returned without downloading, unless `force`: then it is downloaded again and replaced."""
    _check_allowed(url)
    dest_dir = Path(dest_dir) if dest_dir is not None else default_download_dir()
    if (dest_dir / DATASET_NAME).is_dir() and not force:
        return dest_dir / DATASET_NAME
    zip_path = dest_dir / (PurePosixPath(urllib.parse.urlsplit(url).path).name or "pusht.zip")
    download(url, zip_path, zip_sha256, **download_kw)
    try:
        store = extract_store(zip_path, dest_dir, DATASET_NAME, arrays, force=force)
    except DpkitError:
        zip_path.unlink()  # wrong content: the next run downloads afresh
        raise
    zip_path.unlink()
    return store


def find_or_download(path: str | os.PathLike | None = None, *, dest_dir=None, force: bool = False,
                     **fetch_kw) -> Path:
    """resolve_dataset_path(path); when it finds nothing on its own (no path, no $DPKIT_PUSHT_DATA),
    fetch_pusht(dest_dir, **fetch_kw) (which uses a store already in dest_dir). An explicit path that does
    not exist is an error, not a download. `force`: download into dest_dir again whatever exists."""
    if force:
        if path is not None:
            raise InputError("--force downloads into --dest again; it does not go with --data")
        dest = Path(dest_dir) if dest_dir is not None else default_download_dir()
        print(f"[dpkit] downloading the PushT dataset again into {dest} (--force)", file=sys.stderr, flush=True)
        return fetch_pusht(dest, force=True, **fetch_kw)
    try:
        return resolve_dataset_path(path)
    except DatasetNotFound as missing:
        dest = Path(dest_dir) if dest_dir is not None else default_download_dir()
        if (dest / DATASET_NAME).is_dir():  # fetched here before (a --dest outside the usual places)
            return dest / DATASET_NAME
        try:
            _check_allowed(fetch_kw.get("url", DATASET_URL))
            print(f"[dpkit] PushT dataset not found locally; downloading it into {dest}", file=sys.stderr, flush=True)
            return fetch_pusht(dest, **fetch_kw)
        except DpkitError as e:  # offline, refused, or a failed download: say what was looked for, too
            raise DpkitError(f"{missing}; {e}") from None


@cli_entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpkit.train.download", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="use this dataset if it exists (as dpkit-train --data)")
    ap.add_argument("--dest", help="download folder (default: data/pusht/ of the project)")
    ap.add_argument("--url", default=DATASET_URL, help="where to download pusht.zip from (default: %(default)s)")
    ap.add_argument("--force", action="store_true",
                    help="download again into --dest and replace the copy there (default: reuse a copy found)")
    ap.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, metavar="SECONDS",
                    help=f"give up when the download has taken this long in all (default {DEFAULT_DEADLINE_S:g}; "
                         f"the .part file is kept for the next run)")
    ap.add_argument("--min-rate", type=float, default=DEFAULT_MIN_RATE, metavar="BYTES_PER_S",
                    help=f"give up when less than this arrives per second over {DEFAULT_RATE_WINDOW_S:g} s "
                         f"(default {DEFAULT_MIN_RATE:g}; 0: no minimum)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    _check_bounds(deadline=args.deadline, min_rate=args.min_rate)
    print(find_or_download(args.data, dest_dir=args.dest, force=args.force, url=args.url,
                           progress=not args.no_progress, deadline=args.deadline, min_rate=args.min_rate))
    return 0


if __name__ == "__main__":
    main()
