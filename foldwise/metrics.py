"""Confusion matrices of label maps, and IoU, mIoU and pixel accuracy from them: the one numpy implementation
every package scores with.

mIoU convention (docs/ARCHITECTURE.md): one confusion matrix over the whole dataset (pixels labelled 255
dropped), IoU per class, mean over the classes whose union is non-zero. Confusion matrices are int64 with
rows = target and columns = prediction, so per-image or per-worker matrices can simply be summed.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_label_pair(target_shape: tuple, pred_shape: tuple, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError unless a target and a prediction can be counted together (numpy or torch alike)."""
    if tuple(target_shape) != tuple(pred_shape):
        raise ValueError(f"target shape {tuple(target_shape)} != pred shape {tuple(pred_shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes {num_classes})")


def _unsigned(a: np.ndarray) -> np.ndarray:
    # Viewed as unsigned, negative values become huge, so one max() pass checks both bounds.
    return a.view(a.dtype.str.replace("i", "u")) if a.dtype.kind == "i" else a


def _first_outside(values: np.ndarray, high: int) -> int:
    bad = values[(values < 0) | (values >= high)]
    return int(bad.flat[0])


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255, *,
                     none_column: bool = False) -> np.ndarray:
    """Confusion matrix of integer label maps (rows = target, columns = prediction).

    Args:
        target: integer array of class ids in ``[0, num_classes)`` or ``ignore_index`` (any shape).
        pred: integer array of predicted class ids in ``[0, num_classes)``, same shape as ``target``; with
            ``none_column`` also ``num_classes``, meaning that no class claimed the pixel.
        num_classes: number of classes C.
        ignore_index: target value whose pixels are dropped.
        none_column: add a last column counting labelled pixels no class claimed (a submission may leave a
            pixel empty): wrong for every class.

    Returns:
        ``(C, C)`` int64 counts, ``(C, C + 1)`` with ``none_column``.
    """
    target, pred = np.asarray(target), np.asarray(pred)
    check_label_pair(target.shape, pred.shape, num_classes, ignore_index)
    for name, arr in (("target", target), ("pred", pred)):
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    C, columns = num_classes, num_classes + none_column
    t, p = target.ravel(), pred.ravel()
    if t.size == 0:
        return np.zeros((C, columns), dtype=np.int64)
    # Predictions are checked everywhere: a prediction is never allowed to be off-range.
    if int(_unsigned(p).max()) >= columns:
        raise ValueError(f"pred has value {_first_outside(p, columns)} outside [0, {columns})")
    if columns <= 127 and t.dtype != np.uint8 and int(_unsigned(t).max()) <= 255:
        t = t.astype(np.uint8)
    if t.dtype == np.uint8 and columns <= 127:
        return _confusion_uint8(t, p, C, columns, ignore_index)
    valid = t != ignore_index
    if not valid.all():
        t, p = t[valid], p[valid]
    if t.size and (int(t.min()) < 0 or int(t.max()) >= C):
        raise ValueError(
            f"target has value {_first_outside(t, C)} outside [0, {C}) and != ignore_index {ignore_index}")
    idx = t.astype(np.int64) * columns + p.astype(np.int64)
    return np.bincount(idx, minlength=C * columns).reshape(C, columns).astype(np.int64, copy=False)


_CHUNK = 1 << 16  # indices per bincount call: its int64 copy of them stays in cache


def _confusion_uint8(t: np.ndarray, p: np.ndarray, C: int, columns: int, ignore_index: int) -> np.ndarray:
    # No boolean masking: every target value v in [0, 256) gets its own row, so ignored and off-range
    # pixels land in rows >= C and are sliced off (and off-range ones reported). Indices stay 16-bit
    # (< 256 * columns <= 32512); np.bincount copies what it counts to int64, so it counts cache-sized
    # chunks rather than one copy of every index (bench/bench_metrics.py).
    idx = np.multiply(t, np.uint16(columns), dtype=np.uint16)
    np.add(idx, p, out=idx, dtype=np.uint16, casting="unsafe")  # p is already checked to be in [0, columns)
    counts = np.zeros(256 * columns, np.int64)
    for start in range(0, idx.size, _CHUNK):
        counts += np.bincount(idx[start:start + _CHUNK], minlength=256 * columns)
    extra = counts[C * columns:].reshape(256 - C, columns).sum(axis=1)
    for row in np.flatnonzero(extra):
        if row + C != ignore_index:
            raise ValueError(f"target has value {row + C} outside [0, {C}) and != ignore_index {ignore_index}")
    return counts[: C * columns].reshape(C, columns)


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
