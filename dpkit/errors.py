"""The one exception type user-facing code raises for bad input, and the CLI wrapper that prints it."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class DpkitError(Exception):
    """Bad input or a failed precondition, with a message that says what and where.

    CLIs print it as one line and exit non-zero; no traceback.
    """

    exit_code = 1


class InputError(DpkitError, ValueError):
    """The caller passed something wrong (an argument, an observation's shape or values, injected noise).

    Also a ValueError, like the C++ runtime's `_core.InputError`, so each backend raises the same kinds.
    """


def cli_entry(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI `main` so DpkitError (and Ctrl-C) become one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except DpkitError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        raise SystemExit(rc or 0)

    return wrapper
