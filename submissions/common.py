"""Helpers shared by the submissions modules: the error type and the numpy mIoU.

Atomic writes and the class list come from the torch-free leaf ``foldwise``.
"""

from __future__ import annotations

import numpy as np

from foldwise.classes import DEFAULT_CLASSES, IGNORE_INDEX
from foldwise.io import atomic_path

__all__ = ["DEFAULT_CLASSES", "IGNORE_INDEX", "SubmissionError", "atomic_path", "confusion_matrix", "iou_per_class",
           "mean_iou", "pixel_accuracy"]

class SubmissionError(ValueError):
    """A malformed submission, RLE string, label file or leaderboard; the message is one line."""


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
