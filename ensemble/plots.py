"""Plots of a blend (matplotlib Agg, PNG, written atomically): weights and temperatures, per-class IoU."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from foldwise.figures import save_figure  # noqa: E402


def plot_weights(
    names: Sequence[str],
    weights: Sequence[float] | Sequence[Sequence[float]],
    temperatures: Sequence[float],
    path: Path,
    title: str,
    classes: Sequence[str] | None = None,
) -> None:
    """Each member's blend weight and temperature: bars, or a member x class heat map for per-class weights.

    Args:
        names: member names. weights: one per member, or (members, classes) per-class weights.
        temperatures: one per member.
        path: destination PNG.
        title: figure title.
        classes: class names (needed for per-class weights).
    """
    per_class = np.ndim(weights) == 2
    if per_class and (classes is None or np.shape(weights)[1] != len(classes)):
        raise ValueError(f"per-class weights {np.shape(weights)} need one class name per column")
    n = len(names)
    fig, (ax_w, ax_t) = plt.subplots(
        1, 2, figsize=(9 + (0.45 * len(classes) if per_class else 0), 0.4 * n + 1.6 + (1.0 if per_class else 0)),
        sharey=True, gridspec_kw={"width_ratios": [3 if per_class else 1, 1]},
    )
    y = np.arange(n)
    if per_class:
        grid = np.asarray(weights, dtype=float)
        ax_w.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax_w.set_xticks(np.arange(len(classes)), classes, rotation=45, ha="right")
        for (i, c), v in np.ndenumerate(grid):
            ax_w.text(c, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 else "black")
        ax_w.set_title("weight per class (each column sums to 1)", fontsize=9)
    else:
        ax_w.barh(y, weights, color="tab:blue")
        ax_w.set_xlim(0, 1)
        ax_w.set_xlabel("weight")
        for i, v in enumerate(weights):
            ax_w.text(min(v, 0.85) + 0.01, i, f"{v:.3f}", va="center", fontsize=8)
        ax_w.invert_yaxis()
    ax_w.set_yticks(y, names)
    ax_t.barh(y, temperatures, color="tab:orange")
    ax_t.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax_t.set_xlabel("temperature")
    for i, v in enumerate(temperatures):
        ax_t.text(v + 0.01, i, f"{v:.2f}", va="center", fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_per_class(
    classes: Sequence[str], per_model: Mapping[str, Sequence[float]], blend: Sequence[float], path: Path, title: str
) -> None:
    """Grouped bars of per-class IoU: each member and the blend (drawn last, outlined).

    Args:
        classes: class names.
        per_model: member name -> per-class IoU (nan where a class is absent).
        blend: per-class IoU of the blend.
        path: destination PNG.
        title: figure title.
    """
    series = [*per_model.items(), ("blend", blend)]
    n, k = len(classes), len(series)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * n * max(1, k / 2)), 4))
    x = np.arange(n)
    for j, (name, iou) in enumerate(series):
        values = [0.0 if math.isnan(v) else float(v) for v in iou]
        is_blend = j == k - 1
        ax.bar(x + (j - (k - 1) / 2) * width, values, width, label=name,
               color="black" if is_blend else None, alpha=0.85 if is_blend else 0.75)
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU (full-resolution OOF)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)
