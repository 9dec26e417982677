"""What every dpkit-* command owes bad input, checked in one place: exit 1 and one `error: ...` line."""

from __future__ import annotations

from typing import Callable

import pytest


def refused(main: Callable[[list[str]], int], capsys, argv: list[str], *needles: str) -> str:
    """Run `main(argv)`; it must exit 1 with one stderr line starting "error: " that holds every needle."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    return err
