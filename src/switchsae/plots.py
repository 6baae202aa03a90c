"""Figures for the benchmarks and experiments: matplotlib without a display (the Agg backend),
saved as PNG all-or-nothing (`switchsae.files.atomic_write`)."""

from __future__ import annotations

from pathlib import Path

from switchsae.files import atomic_write


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 120) -> Path:
    """Lay `fig` out tightly, write it to `path` as a PNG (atomically) and close it.  -> path."""
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    pyplot().close(fig)
    return Path(path)
