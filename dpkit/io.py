"""Atomic file and folder writes: a reader never sees a half-written result.

Everything is written under a temp name beside its target and renamed into place. Temp names say who
made them, `.<name>.dpkit-<host>-<pid>-<random>.tmp`, so a later write into the same folder can remove
what a killed writer left behind: entries of that pattern whose process (on this host) is gone, or any
older than STALE_TMP_AGE_S (a writer on another host that shares the folder).

`folder_lock(folder)` makes a writer of an output folder (a run, a bundle) the only one while it works.

Also `sha256_file(path)`, the one file digest (bundle graphs, converted weights, the dataset download): it
lives here, in the core room, because train, convert and runtime may all import core but not each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from dpkit.errors import DpkitError

# JSON read from outside (state.json, a converted source's config.json) nests at most this deep; deeper text is
# refused before parsing, which recurses. policy.json's reader (cpp/src/manifest.cpp) has the same bound
# (tests/test_bundle_contract.py checks that they agree).
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.S)


def json_depth(text: str) -> int:
    """Deepest bracket nesting of JSON text, counted outside strings (before parsing, which recurses)."""
    steps = {"[": 1, "{": 1, "]": -1, "}": -1}
    brackets = (steps[c] for c in re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub("", text)))
    return max(itertools.accumulate(brackets, initial=0))


STALE_TMP_AGE_S = 24 * 3600
"""A temp entry this old is stale whoever made it (no write of dpkit's takes a day)."""
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TMP_NAME = re.compile(r"^\..+\.dpkit-([0-9a-f]{8})-(\d+)-[0-9a-f]+\.tmp$")


def _tmp_path(final: Path) -> Path:
    # The target's name is shortened so the temp name stays within the usual 255-byte limit.
    return final.with_name(f".{final.name[:160]}.dpkit-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid we cannot ask about): assume it is alive
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders of dead writers in `folder` (see the module docstring)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TMP_NAME.match(entry.name)
        if m is None:
            continue
        host, pid = m.group(1), int(m.group(2))
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        dead = host == _HOST and pid != os.getpid() and not _pid_alive(pid)
        if not dead and age < STALE_TMP_AGE_S:
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (a graph or a dataset need not fit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        tmp = _tmp_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask gives the usual permissions
    except OSError as e:
        raise DpkitError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail early (before long work) when `path` cannot be created or written into; leave nothing behind.

    The folder itself, or else its nearest existing ancestor, is probed by really creating and removing a
    file there (permission bits do not show a read-only mount, and root passes every permission check).
    """
    path = Path(path)
    probe_dir = path
    try:
        while not probe_dir.exists() and not probe_dir.is_symlink():
            if probe_dir.parent == probe_dir:
                break
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            kind = "a dangling link" if probe_dir.is_symlink() and not probe_dir.exists() else "not a folder"
            where = "it" if probe_dir == path else str(probe_dir)
            raise DpkitError(f"cannot create {what} {path}: {where} is {kind}")
        probe = _tmp_path(probe_dir / "write-probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        where = "" if probe_dir == path else f" (creating a file in {probe_dir} failed)"
        raise DpkitError(f"{what} {path} is not writable: {e.strerror}{where}") from None
    return path


def check_writable_file(path: str | os.PathLike) -> Path:
    """Fail early (before long work) when `path` cannot be written."""
    path = Path(path)
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    if path.is_dir():
        raise DpkitError(f"{path} is a folder, expected a file path")
    return path


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of an output folder: beside it, so it neither creates the folder nor moves with it when a
    finished result is renamed into place."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name[:160]}.dpkit-lock")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Hold the advisory lock of `folder` (fcntl.flock on `lock_path(folder)`) while writing it: one writer
    at a time. A second writer gets one DpkitError naming the holder's pid. The lock dies with its process,
    so a killed writer's lock file is simply taken over; a released one is removed."""
    import fcntl

    folder = Path(os.path.abspath(folder))
    path = lock_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpkitError(f"cannot create {what} {folder}: {e.strerror}") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DpkitError(f"cannot lock {what} {folder}: {e.strerror} ({path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").split()
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            raise DpkitError(f"{what} {folder} is being written by another process (pid {pid}, lock {path}); "
                             f"wait for it to finish or stop it") from None
        try:  # the file may have been removed by the writer that released it just before: lock the current one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: a waiting writer then retries on a new file
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename.

    If `final` exists and not `force`, raise before any work. On error the temp folder is removed
    and an existing `final` is left untouched; temp folders of killed writers are removed on the next call
    into the same parent.
    """
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.is_dir():
        os.replace(old, final)  # an earlier call was stopped between its two renames: put the old folder back
    if final.exists() and not force:
        raise DpkitError(f"{final} already exists (use --force to replace it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final.parent)
        tmp = _tmp_path(final)
        tmp.mkdir(0o777)  # the umask gives the usual permissions
    except OSError as e:
        raise DpkitError(f"cannot write into {final.parent}: {e.strerror}") from None
    try:
        yield tmp
        if final.exists() and not force:  # checked again at the end: a concurrent writer finished first
            raise DpkitError(f"{final} appeared while this result was being written (another writer?); "
                             f"it was left as it is and this result discarded (use --force to replace it)")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, final)  # refuses a non-empty folder another writer put there since the check
            except OSError as e:
                raise DpkitError(f"cannot publish {final}: {e.strerror} (another writer?); this result was "
                                 f"discarded") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
