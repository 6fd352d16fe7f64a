"""Saving a matplotlib figure as a PNG, atomically (plots of kfold and ensemble alike)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402

from foldwise.io import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save ``fig`` as a PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
