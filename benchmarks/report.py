"""What the benchmarks write: matplotlib without a display, a figure as PNG bytes, and a result's
JSON / Markdown / PNG triple written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from dpkit.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (benchmarks run on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """`fig` laid out and encoded as PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def write_report(stem: Path, result: dict[str, Any], markdown: str, png: bytes) -> None:
    """`stem`.json, .md and .png (each atomically), then the Markdown and where it went on stdout."""
    atomic_write_json(stem.with_suffix(".json"), result)
    atomic_write_text(stem.with_suffix(".md"), markdown)
    atomic_write_bytes(stem.with_suffix(".png"), png)
    print(markdown)
    print(f"wrote {stem}.json/.md/.png")
