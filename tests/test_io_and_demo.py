"""Atomic folder replacement and the demo's promise that a failed run never loses the previous results."""

from __future__ import annotations

import os

import pytest

from dpkit import demo
from dpkit.errors import DpkitError
from dpkit.io import atomic_dir


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "bundle"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(DpkitError, match="already exists"):
        with atomic_dir(final):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(final, force=True) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("export failed")
    assert (final / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_atomic_dir_recovers_from_a_stop_between_its_renames(tmp_path):
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "a").write_text("old")
    os.replace(final, tmp_path / ".bundle.old")  # what a crash after the first rename leaves
    with pytest.raises(DpkitError, match="already exists"):
        with atomic_dir(final):
            pass
    assert (final / "a").read_text() == "old"


def _run_demo(argv) -> int:
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    return e.value.code


def test_failed_demo_restores_previous_results(tmp_path, capsys):
    out = tmp_path / "demo_out"
    out.mkdir()
    (out / "report.md").write_text("earlier report")
    # Training fails at once on a dataset that does not exist.
    assert _run_demo(["--out", str(out), "--data", str(tmp_path / "missing.zarr"), "--train-seconds", "1"]) == 1
    assert (out / "report.md").read_text() == "earlier report"
    assert not (tmp_path / "demo_out.prev").exists()
    assert "previous results" in capsys.readouterr().err


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    other = tmp_path / "project"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert _run_demo(["--out", str(other), "--train-seconds", "1"]) == 1
    assert "is not an earlier demo output" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
