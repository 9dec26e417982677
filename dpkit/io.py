"""Atomic file and folder writes: a reader never sees a half-written result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dpkit.errors import DpkitError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DpkitError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` if needed and fail early (before long work) when it cannot be written into."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpkitError(f"cannot create {what} {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise DpkitError(f"{what} {path} is not writable")
    return path


def check_writable_file(path: str | os.PathLike) -> Path:
    """Fail early (before long work) when `path` cannot be written."""
    path = Path(path)
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    if path.is_dir():
        raise DpkitError(f"{path} is a folder, expected a file path")
    return path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename.

    If `final` exists and not `force`, raise before any work. On error the temp folder is removed
    and an existing `final` is left untouched.
    """
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.is_dir():
        os.replace(old, final)  # an earlier call was stopped between its two renames: put the old folder back
    if final.exists() and not force:
        raise DpkitError(f"{final} already exists (use --force to replace it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as e:
        raise DpkitError(f"cannot write into {final.parent}: {e.strerror}") from None
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
