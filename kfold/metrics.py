"""Segmentation and depth metrics.

mIoU convention (docs/ARCHITECTURE.md): one confusion matrix over the whole dataset, pixels labelled
``ignore_index`` dropped, IoU per class, mean over the classes whose union is non-zero. Confusion
matrices are ``(C, C)`` int64 with rows = target and columns = prediction, so per-batch or per-rank
matrices can simply be summed (or ``all_reduce``-d).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from foldwise.metrics import iou_per_class, mean_iou, pixel_accuracy

__all__ = ["DepthMeter", "confusion_matrix", "confusion_matrix_torch", "iou_per_class", "mean_iou", "pixel_accuracy"]

__all__ = [
    "DepthMeter",
    "confusion_matrix",
    "confusion_matrix_torch",
    "iou_per_class",
    "mean_iou",
    "pixel_accuracy",
]


def _check_pair(target_shape: tuple, pred_shape: tuple, num_classes: int, ignore_index: int) -> None:
    if tuple(target_shape) != tuple(pred_shape):
        raise ValueError(f"target shape {tuple(target_shape)} != pred shape {tuple(pred_shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes {num_classes})")


def _unsigned(a: np.ndarray) -> np.ndarray:
    # Viewed as unsigned, negative values become huge, so one max() pass checks both bounds.
    return a.view(a.dtype.str.replace("i", "u")) if a.dtype.kind == "i" else a


def _first_outside(values: np.ndarray, num_classes: int) -> int:
    bad = values[(values < 0) | (values >= num_classes)]
    return int(bad.flat[0])


def confusion_matrix(
    target: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """Confusion matrix of integer label maps (rows = target, cols = prediction).

    Args:
        target: integer array of class ids in ``[0, num_classes)`` or ``ignore_index`` (any shape).
        pred: integer array of predicted class ids in ``[0, num_classes)``, same shape as ``target``.
        num_classes: number of classes C.
        ignore_index: target value whose pixels are dropped.

    Returns:
        ``(C, C)`` int64 counts.
    """
    target = np.asarray(target)
    pred = np.asarray(pred)
    _check_pair(target.shape, pred.shape, num_classes, ignore_index)
    for name, arr in (("target", target), ("pred", pred)):
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    C = num_classes
    t = target.ravel()
    p = pred.ravel()
    if t.size == 0:
        return np.zeros((C, C), dtype=np.int64)
    # Predictions are checked everywhere: a prediction is never allowed to be off-range.
    if int(_unsigned(p).max()) >= C:
        raise ValueError(f"pred has value {_first_outside(p, C)} outside [0, {C})")
    if C <= 127 and t.dtype != np.uint8 and int(_unsigned(t).max()) <= 255:
        t = t.astype(np.uint8)
    if t.dtype == np.uint8 and C <= 127:
        return _confusion_uint8(t, p, C, ignore_index)

    valid = t != ignore_index
    if not valid.all():
        t, p = t[valid], p[valid]
    if t.size and (int(t.min()) < 0 or int(t.max()) >= C):
        raise ValueError(
            f"target has value {_first_outside(t, C)} outside [0, {C}) and != ignore_index {ignore_index}"
        )
    idx = t.astype(np.int64) * C + p.astype(np.int64)
    return np.bincount(idx, minlength=C * C).reshape(C, C).astype(np.int64, copy=False)


def _confusion_uint8(t: np.ndarray, p: np.ndarray, C: int, ignore_index: int) -> np.ndarray:
    # No boolean masking: every target value v in [0, 256) gets its own row, so ignored and off-range
    # pixels land in rows >= C and are sliced off (and off-range ones reported). Indices stay 16-bit
    # (< 256 * C <= 32512) and are counted by torch.bincount, which reads int16 directly; np.bincount
    # would first copy them to int64 (~3x slower on 50M pixels).
    idx = np.multiply(t, np.uint16(C), dtype=np.uint16)
    np.add(idx, p, out=idx, dtype=np.uint16, casting="unsafe")  # p is already checked to be in [0, C)
    counts = torch.bincount(torch.from_numpy(idx.view(np.int16)), minlength=256 * C).numpy()
    extra = counts[C * C :].reshape(256 - C, C).sum(axis=1)
    for row in np.flatnonzero(extra):
        if row + C != ignore_index:
            raise ValueError(
                f"target has value {row + C} outside [0, {C}) and != ignore_index {ignore_index}"
            )
    return counts[: C * C].reshape(C, C).astype(np.int64, copy=False)


def confusion_matrix_torch(
    target: Tensor, pred: Tensor, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """Confusion matrix on the tensors' device (rows = target, cols = prediction).

    Args:
        target: integer tensor of class ids in ``[0, num_classes)`` or ``ignore_index``.
        pred: integer tensor of predicted class ids, same shape and device as ``target``.
        num_classes: number of classes C.
        ignore_index: target value whose pixels are dropped.

    Returns:
        ``(C, C)`` int64 tensor on the input device (ready for ``dist.all_reduce``).
    """
    _check_pair(tuple(target.shape), tuple(pred.shape), num_classes, ignore_index)
    for name, ten in (("target", target), ("pred", pred)):
        if ten.dtype.is_floating_point or ten.dtype.is_complex or ten.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {ten.dtype}")
    C = num_classes
    t = target.reshape(-1)
    p = pred.reshape(-1).to(t.device)
    valid = t != ignore_index
    bad_t = valid & ((t < 0) | (t >= C))
    bad_p = (p < 0) | (p >= C)
    # One host sync for both checks.
    flags = torch.stack([bad_t.any(), bad_p.any()]).tolist()
    if flags[0]:
        raise ValueError(
            f"target has value {int(t[bad_t][0])} outside [0, {C}) and != ignore_index {ignore_index}"
        )
    if flags[1]:
        raise ValueError(f"pred has value {int(p[bad_p][0])} outside [0, {C})")
    index_dtype = torch.int32 if C * C < 2**31 - 1 else torch.int64
    # Ignored pixels go to an extra bin instead of being masked out (masking would sync on CUDA).
    idx = torch.where(valid, t.to(index_dtype) * C + p.to(index_dtype), C * C)
    return torch.bincount(idx, minlength=C * C + 1)[: C * C].reshape(C, C)


class DepthMeter:
    """Accumulates RMSE, AbsRel and delta<1.25 over the valid (``target > 0``) pixels of a dataset.

    The state is a float64 tensor of sums ``[n, sum_sq_err, sum_abs_rel, n_delta1]``; in DDP,
    ``dist.all_reduce(meter.state)`` before ``compute()`` gives the global metrics.

    Args:
        device: device of the state; it follows the predictions of the first ``update`` otherwise.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.state = torch.zeros(4, dtype=torch.float64, device=device)

    def reset(self) -> None:
        self.state.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            pred: predicted depth in metres, ``(B, 1, h, w)`` or ``(B, h, w)``; resized bilinearly to the
                target size when it differs.
            target: depth in metres, ``(B, 1, H, W)`` or ``(B, H, W)``; 0 (or non-finite) = missing.
        """
        pred = pred.detach()
        target = target.detach()
        if pred.dim() == 3:
            pred = pred.unsqueeze(1)
        if target.dim() == 3:
            target = target.unsqueeze(1)
        if pred.dim() != 4 or target.dim() != 4 or pred.shape[:2] != target.shape[:2] or pred.shape[1] != 1:
            raise ValueError(
                f"depth pred shape {tuple(pred.shape)} and target shape {tuple(target.shape)} "
                "must be (B, 1, h, w) and (B, 1, H, W)"
            )
        target = target.to(pred.device)
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        pred = pred.double()
        target = target.double()
        valid = (target > 0) & torch.isfinite(target)
        t = torch.where(valid, target, torch.ones_like(target))
        err = torch.where(valid, pred - target, torch.zeros_like(pred))
        # A non-positive prediction is never within 25% of a positive depth.
        ratio = torch.maximum(pred / t, t / pred)
        delta1 = valid & (pred > 0) & (ratio < 1.25)
        batch = torch.stack([
            valid.sum().double(),
            (err * err).sum(),
            (err.abs() / t).sum(),
            delta1.sum().double(),
        ])
        if self.state.device != batch.device:
            self.state = self.state.to(batch.device)
        self.state += batch

    def compute(self) -> dict[str, float]:
        """Return ``{"rmse", "absrel", "delta1"}`` (``nan`` when no valid pixel was seen)."""
        n, sq, rel, d1 = self.state.tolist()
        if n == 0:
            return {"rmse": float("nan"), "absrel": float("nan"), "delta1": float("nan")}
        return {"rmse": (sq / n) ** 0.5, "absrel": rel / n, "delta1": d1 / n}
