"""dpkit's exception types, shared by Python and the C++ runtime, and the CLI wrapper that prints them.

    from dpkit.errors import DpkitError, InputError, RuntimeFailure
    try:
        policy.sample(obs)
    except InputError as e:      # a bad argument, from any backend (also a ValueError)
        ...

The C++ runtime's errors arrive as these classes (dpkit.runtime._core.InputError is InputError,
_core.Error is RuntimeFailure), so one `except` clause serves every backend.
"""

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

    Also a ValueError. The C++ runtime raises this class itself (`_core.InputError` is it).
    """


class RuntimeFailure(DpkitError, RuntimeError):
    """A failure that is not a bad argument, raised by the C++ runtime (`_core.Error` is this class): a bundle it
    cannot load or verify, ONNX Runtime refusing a graph or a session, an unavailable provider.

    Also a RuntimeError, so `except RuntimeError` around the C++ backend keeps working.
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
