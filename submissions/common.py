"""Helpers shared by the submissions modules: the error type and the confusion matrix with a "none" column.

Atomic writes, the class list and the IoU functions come from the torch-free leaf ``foldwise``.
"""

from __future__ import annotations

import numpy as np

from foldwise.classes import DEFAULT_CLASSES, IGNORE_INDEX
from foldwise.io import atomic_path
from foldwise.metrics import iou_per_class, mean_iou, pixel_accuracy

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
