"""Helpers shared by the submissions modules: the error type.

Atomic writes, the class list, the confusion matrix and the IoU functions come from the torch-free leaf
``foldwise``.
"""

from __future__ import annotations

from foldwise.classes import DEFAULT_CLASSES, IGNORE_INDEX
from foldwise.io import atomic_path
from foldwise.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

__all__ = ["DEFAULT_CLASSES", "IGNORE_INDEX", "SubmissionError", "atomic_path", "confusion_matrix", "iou_per_class",
           "mean_iou", "pixel_accuracy"]


class SubmissionError(ValueError):
    """A malformed submission, RLE string, label file or leaderboard; the message is one line."""
