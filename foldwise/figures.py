"""Saving a matplotlib figure as a PNG, atomically, and the class colours (plots of kfold and ensemble alike)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402

from foldwise.io import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save ``fig`` as a PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours, tab20 by class id (a class keeps its colour whatever the class
    count); the last one (black) is for ignored pixels."""
    colours = (np.asarray(plt.get_cmap("tab20")(np.arange(num_classes) % 20))[:, :3] * 255).astype(np.uint8)
    return np.vstack([colours, np.zeros((1, 3), np.uint8)])
