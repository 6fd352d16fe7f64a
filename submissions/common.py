"""Helpers shared by the submissions modules: the error type, atomic writes and the mIoU.

``kfold`` has its own versions (``kfold.io``, ``kfold.metrics``), but the import flow is one-way
(``ensemble -> kfold, submissions``) and ``submissions`` must stay free of torch and of the other
packages, so the two small pieces it needs are repeated here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255

# Same list as kfold.data.layout.DEFAULT_CLASSES (repeated: submissions cannot import kfold).
DEFAULT_CLASSES: tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
    "picture", "sofa", "table", "tv", "wall", "window",
)


class SubmissionError(ValueError):
    """A malformed submission, RLE string, label file or leaderboard; the message is one line."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file lives in the same folder so that ``os.replace`` is an atomic rename: a crash
    never leaves a half-written file under the final name.

    Args:
        path: the final file name. Its folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix with an extra "none" prediction column.

    Args:
        target: integer labels in ``[0, num_classes)`` or ``IGNORE_INDEX`` (dropped).
        pred: integer predictions in ``[0, num_classes]``; ``num_classes`` means no class claimed
            the pixel (always wrong for a labelled pixel).
        num_classes: number of real classes C.

    Returns:
        (C, C + 1) int64, rows = target, columns = prediction (last column = "none").
    """
    target = np.asarray(target).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    keep = target != IGNORE_INDEX
    index = target[keep] * (num_classes + 1) + pred[keep]
    counts = np.bincount(index, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of each class from a (C, C) or (C, C + 1) matrix; nan where the union is zero."""
    c = cm.shape[0]
    tp = np.diag(cm[:, :c]).astype(np.float64)
    union = cm.sum(axis=1) + cm[:, :c].sum(axis=0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes whose union is non-zero (nan when there is none)."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of labelled pixels predicted correctly (nan when no pixel is labelled)."""
    total = cm.sum()
    c = cm.shape[0]
    return float(np.trace(cm[:, :c]) / total) if total else float("nan")
