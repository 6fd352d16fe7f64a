"""IoU, mIoU and pixel accuracy from a confusion matrix: the one numpy implementation every package scores with.

mIoU convention (docs/ARCHITECTURE.md): one confusion matrix over the whole dataset (pixels labelled 255
dropped), IoU per class, mean over the classes whose union is non-zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def as_matrix(cm: Any) -> np.ndarray:
    """A (C, C) or (C, C + 1) confusion matrix as float64 numpy (a torch tensor is copied off its device).

    The extra column of a (C, C + 1) matrix counts labelled pixels that no class claimed (a submission
    may leave a pixel empty): wrong for every class, so it enters the union but never the diagonal.
    """
    if hasattr(cm, "detach"):  # a torch tensor, without importing torch here
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[1] not in (cm.shape[0], cm.shape[0] + 1):
        raise ValueError(f"confusion matrix must be (C, C) or (C, C + 1), got shape {cm.shape}")
    return cm


def iou_per_class(cm: Any) -> np.ndarray:
    """float64 (C,) IoU of every class; nan for a class neither labelled nor predicted (union 0)."""
    cm = as_matrix(cm)
    c = cm.shape[0]
    tp = np.diag(cm[:, :c])
    union = cm.sum(axis=1) + cm[:, :c].sum(axis=0) - tp
    iou = np.full(c, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return iou


def mean_iou(cm: Any) -> float:
    """Mean IoU over the classes whose union is non-zero (nan when there is none)."""
    iou = iou_per_class(cm)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


def pixel_accuracy(cm: Any) -> float:
    """Fraction of counted pixels predicted correctly (nan for an empty matrix)."""
    cm = as_matrix(cm)
    total = cm.sum()
    return float(np.trace(cm[:, : cm.shape[0]]) / total) if total > 0 else float("nan")
