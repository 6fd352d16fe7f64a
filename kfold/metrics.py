"""Segmentation and depth metrics on tensors (the numpy confusion matrix and IoU are ``foldwise.metrics``').

mIoU convention (docs/ARCHITECTURE.md): one confusion matrix over the whole dataset, pixels labelled
``ignore_index`` dropped, IoU per class, mean over the classes whose union is non-zero. Confusion
matrices are ``(C, C)`` int64 with rows = target and columns = prediction, so per-batch or per-rank
matrices can simply be summed (or ``all_reduce``-d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from foldwise.metrics import check_label_pair, confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

__all__ = [
    "DepthMeter",
    "confusion_matrix",
    "confusion_matrix_torch",
    "iou_per_class",
    "mean_iou",
    "pixel_accuracy",
]


def confusion_matrix_torch(
    target: Tensor, pred: Tensor, num_classes: int, ignore_index: int = 255, check: bool = True
) -> Tensor:
    """Confusion matrix on the tensors' device (rows = target, cols = prediction).

    Args:
        target: integer tensor of class ids in ``[0, num_classes)`` or ``ignore_index``.
        pred: integer tensor of predicted class ids, same shape and device as ``target``.
        num_classes: number of classes C.
        ignore_index: target value whose pixels are dropped.
        check: raise for values outside the classes. Checking reads a flag off the device; a caller whose
            targets were checked when read and whose predictions are an argmax over C classes passes False,
            and nothing then waits for the device.

    Returns:
        ``(C, C)`` int64 tensor on the input device (ready for ``dist.all_reduce``).
    """
    check_label_pair(tuple(target.shape), tuple(pred.shape), num_classes, ignore_index)
    for name, ten in (("target", target), ("pred", pred)):
        if ten.dtype.is_floating_point or ten.dtype.is_complex or ten.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {ten.dtype}")
    C = num_classes
    t = target.reshape(-1)
    p = pred.reshape(-1).to(t.device)
    valid = t != ignore_index
    if check:
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
    # Ignored pixels go to an extra bin instead of being masked out (masking would sync on CUDA).
    if t.is_cuda:  # bincount on CUDA reads the largest index off the device to size its output
        idx = torch.where(valid, t.long() * C + p.long(), C * C)
        counts = torch.zeros(C * C + 1, dtype=torch.int64, device=t.device)
        counts.index_add_(0, idx, torch.ones_like(idx))
    else:
        index_dtype = torch.int32 if C * C < 2**31 - 1 else torch.int64
        idx = torch.where(valid, t.to(index_dtype) * C + p.to(index_dtype), C * C)
        counts = torch.bincount(idx, minlength=C * C + 1)
    return counts[: C * C].reshape(C, C)


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
