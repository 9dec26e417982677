"""The arguments every `dpkit-*` command shares, defined once: --threads, --no-progress (--quiet), --version.

    from dpkit.cli_args import add_common_args, apply_threads
    p = argparse.ArgumentParser(prog="dpkit-eval")
    add_common_args(p, quiet_alias=True)             # --threads N, --no-progress (= --quiet), --version
    args = p.parse_args(argv)
    apply_threads(args)                              # --threads N reaches every library call of this command

`--threads N` means what `threads=` means in Python (dpkit.threads): N intra-op threads for every backend
and for torch; 0 or absent: chosen for this machine and model. A bad value is one line on stderr and exit 1
(through dpkit.errors.cli_entry), like every other bad input.
"""

from __future__ import annotations

import argparse
import os

import dpkit
from dpkit.errors import DpkitError, InputError
from dpkit.threads import parse_threads

THREADS_HELP = ("intra-op threads for torch and ONNX Runtime (default 0: chosen for the CPUs this process may use "
                "and the model's size; see dpkit.threads)")


def _threads(text: str) -> int:
    # A DpkitError is not one of the errors argparse turns into a usage message, so it reaches cli_entry as
    # one line; InputError (a ValueError) would be swallowed into argparse's "invalid value" text.
    try:
        return parse_threads(text, "--threads")
    except InputError as e:
        raise DpkitError(str(e)) from None


def add_common_args(p: argparse.ArgumentParser, *, progress: bool = True, quiet_alias: bool = False) -> None:
    """--threads N, --version and (with `progress`) --no-progress; `quiet_alias` keeps an older --quiet."""
    p.add_argument("--threads", type=_threads, default=0, metavar="N", help=THREADS_HELP)
    p.add_argument("--version", action="version", version=f"%(prog)s {dpkit.__version__}")
    if progress:
        names = ["--no-progress", "--quiet"] if quiet_alias else ["--no-progress"]
        p.add_argument(*names, dest="no_progress", action="store_true", help="no progress bar")


def apply_threads(args: argparse.Namespace) -> int:
    """Pass an explicit --threads on as $DPKIT_THREADS, so every choice this command (and any process it
    starts) makes honours it; returns the request (0: none)."""
    n = int(getattr(args, "threads", 0) or 0)
    if n:
        os.environ["DPKIT_THREADS"] = str(n)
    return n
