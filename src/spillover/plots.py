"""Figures are written like every other output: whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

if "MPLCONFIGDIR" not in os.environ:  # matplotlib's font cache goes to spillover's cache, not ~/.cache
    os.environ["MPLCONFIGDIR"] = os.path.join(
        os.environ.get("SPILLOVER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spillover"),
        "matplotlib")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only; no screen is needed
import matplotlib.pyplot as plt  # noqa: E402

from .io import temp_beside, write_error  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a PNG atomically and close the figure."""
    path = Path(path)
    tmp = temp_beside(path)  # a unique hidden name that remove_temp_files knows
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    finally:
        plt.close(fig)
    return path
