"""Plots are optional (the `plot` extra): one place that loads matplotlib headless and saves figures safely."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("edgepix")


def pyplot(path: Path):
    """matplotlib.pyplot on the Agg backend (no display needed), or None with a warning that names the plot
    skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install 'edgepix[plot]')", path.name)
        return None
    return plt


def save_figure(fig, path: Path, *, dpi: int | None = None) -> None:
    """Write `fig` as a PNG atomically (a reader never sees half a file) and free it."""
    import matplotlib.pyplot as plt

    from edgepix.runtime.core.fileio import atomic_output

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
