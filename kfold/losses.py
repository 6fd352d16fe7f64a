"""Joint segmentation + depth loss: (boundary-weighted, hard-mined) cross-entropy, L1 / berHu depth,
edge-aware depth smoothness, combined with fixed weights or Kendall uncertainty weighting.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfold.config import DepthLoss, Weighting
from tta.functional import apply_temperature

__all__ = ["SegDepthLoss", "berhu_loss", "edge_aware_smoothness", "l1_depth_loss", "label_boundaries",
           "parts_as_floats", "soft_target_loss"]

DEPTH_LOSSES = typing.get_args(DepthLoss)
WEIGHTINGS = typing.get_args(Weighting)
LOG_SIGMA_RANGE = (-2.0, 2.0)


def label_boundaries(label: Tensor, width: int = 1, ignore_index: int = 255) -> Tensor:
    """Pixels whose ``(2 * width + 1)``-square neighbourhood holds another valid label.

    Ignored neighbours never make a boundary, and ignored pixels are never boundary pixels.

    Args:
        label: ``(B, H, W)`` integer class ids, ``ignore_index`` = ignore.
        width: neighbourhood radius in pixels (>= 1).
        ignore_index: label value of unlabelled pixels.

    Returns:
        ``(B, H, W)`` bool mask.
    """
    valid = label != ignore_index
    lab = label.unsqueeze(1).float()
    k = 2 * width + 1
    # Max and min of the valid labels around each pixel: another valid label exists iff one of them
    # differs from the pixel's own label. Ignored pixels are pushed out of reach of max resp. min.
    low = torch.where(valid.unsqueeze(1), lab, torch.full_like(lab, -1.0))
    high = torch.where(valid.unsqueeze(1), lab, torch.full_like(lab, float(2**24)))
    nb_max = F.max_pool2d(low, k, stride=1, padding=width)
    nb_min = -F.max_pool2d(-high, k, stride=1, padding=width)
    return valid & ((nb_max > lab) | (nb_min < lab)).squeeze(1)


def l1_depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over valid depth pixels (``target > 0``); 0 (with a graph) when there is none.

    Args:
        pred: ``(B, 1, H, W)`` predicted depth, same size as ``target``.
        target: ``(B, 1, H, W)`` depth in metres, 0 = missing.
    """
    valid = target > 0
    err = torch.where(valid, (pred - target).abs(), torch.zeros_like(pred))
    return err.sum() / valid.sum().clamp_min(1)


BERHU_THRESHOLDS = {"max_fraction": 0.2, "percentile": 0.8}  # each reading's usual c


def berhu_loss(pred: Tensor, target: Tensor, c_fraction: float = 0.2, threshold: str = "max_fraction") -> Tensor:
    """Reverse Huber (berHu) loss over valid depth pixels (``target > 0``).

    ``|e|`` where ``|e| <= c`` else ``(e^2 + c^2) / (2c)``. Both readings of the threshold are in use:
    ``max_fraction``: ``c = c_fraction * max|e|`` over the batch's valid pixels (Laina et al. 2016);
    ``percentile``: ``c`` = the ``c_fraction`` quantile of ``|e|`` (e.g. 0.8, the 80th percentile), which one
    outlier cannot inflate. ``c`` is detached in both.

    Args:
        pred: ``(B, 1, H, W)`` predicted depth, same size as ``target``.
        target: ``(B, 1, H, W)`` depth in metres, 0 = missing.
        c_fraction: the fraction of the largest error, or the quantile, in (0, 1].
        threshold: ``"max_fraction"`` or ``"percentile"``.
    """
    if threshold not in BERHU_THRESHOLDS:
        raise ValueError(f"threshold must be one of {tuple(BERHU_THRESHOLDS)}, got {threshold!r}")
    valid = target > 0
    err = torch.where(valid, (pred - target).abs(), torch.zeros_like(pred))
    if threshold == "max_fraction":
        c = c_fraction * err.detach().max()
    else:  # kthvalue, not torch.quantile: no size limit on the number of pixels
        valid_err = err.detach()[valid]
        k = max(1, min(valid_err.numel(), math.ceil(c_fraction * valid_err.numel())))
        c = valid_err.kthvalue(k).values if valid_err.numel() else err.new_zeros(())
    # A floor keeps (e^2 + c^2) / 2c finite when the prediction is exact (c = 0, that branch unused).
    c = c.clamp_min(1e-12)
    loss = torch.where(err <= c, err, (err * err + c * c) / (2 * c))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss.sum() / valid.sum().clamp_min(1)


def edge_aware_smoothness(depth: Tensor, image: Tensor) -> Tensor:
    """Edge-aware smoothness of ``depth`` normalised by its per-image mean (Monodepth2).

    ``mean(|dx d| exp(-|dx I|)) + mean(|dy d| exp(-|dy I|))``, image gradients averaged over channels.

    Args:
        depth: ``(B, 1, h, w)`` predicted depth.
        image: ``(B, 3, h, w)`` image at the same resolution.
    """
    d = depth / (depth.mean(dim=(2, 3), keepdim=True) + 1e-7)
    dx_d = (d[:, :, :, :-1] - d[:, :, :, 1:]).abs()
    dy_d = (d[:, :, :-1, :] - d[:, :, 1:, :]).abs()
    dx_i = (image[:, :, :, :-1] - image[:, :, :, 1:]).abs().mean(1, keepdim=True)
    dy_i = (image[:, :, :-1, :] - image[:, :, 1:, :]).abs().mean(1, keepdim=True)
    return (dx_d * torch.exp(-dx_i)).mean() + (dy_d * torch.exp(-dy_i)).mean()


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegDepthLoss(nn.Module):
    """Segmentation cross-entropy plus an auxiliary depth loss.

    Fixed weighting: ``ce + depth_weight * depth + smoothness_weight * smooth``. Kendall weighting
    (Kendall et al. 2018): ``exp(-2 s_seg) * ce + s_seg + 0.5 * exp(-2 s_depth) * depth + s_depth
    + smoothness_weight * smooth`` with learnable log-sigmas ``s`` clamped to [-2, 2]; ``depth_weight``
    is not used there (the learnt weight replaces it). Given a teacher's probabilities, either adds
    ``distill_alpha * soft`` (:func:`soft_target_loss`).

    Args:
        num_classes: number of segmentation classes C.
        class_weights: per-class CE weights (length C), e.g. 1.5 for rare classes; None = all 1.
        boundary_weight: CE weight of pixels at label boundaries (1.0 = off).
        boundary_width: neighbourhood radius (pixels) that defines a boundary pixel.
        ohem_fraction: keep only this fraction (0, 1] of the valid pixels with the largest weighted
            CE (hard pixel mining over the whole batch); None = all pixels.
        depth_loss: "l1", "berhu" or "none".
        depth_weight: weight of the depth loss under fixed weighting.
        weighting: "fixed" or "kendall".
        smoothness_weight: weight of the edge-aware depth smoothness term (0 = off).
        ignore_index: label value of unlabelled pixels.
        berhu_threshold: ``"max_fraction"`` or ``"percentile"`` (see :func:`berhu_loss`).
        berhu_c: its fraction or quantile; None = 0.2 for max_fraction, 0.8 for percentile.
        distill_alpha: weight of the soft-target term (:func:`soft_target_loss`) when targets are given.
        distill_temperature: its temperature.
    """

    def __init__(
        self,
        num_classes: int,
        class_weights: Sequence[float] | None = None,
        boundary_weight: float = 1.0,
        boundary_width: int = 1,
        ohem_fraction: float | None = None,
        depth_loss: str = "l1",
        depth_weight: float = 0.1,
        weighting: str = "fixed",
        smoothness_weight: float = 0.0,
        ignore_index: int = 255,
        berhu_threshold: str = "max_fraction",
        berhu_c: float | None = None,
        distill_alpha: float = 0.0,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != num_classes:
                raise ValueError(f"class_weights has {len(class_weights)} values, expected {num_classes}")
            if any(w < 0 or not math.isfinite(w) for w in class_weights):
                raise ValueError(f"class_weights must be finite and >= 0, got {class_weights}")
        if not boundary_weight > 0:
            raise ValueError(f"boundary_weight must be > 0, got {boundary_weight}")
        if int(boundary_width) != boundary_width or boundary_width < 1:
            raise ValueError(f"boundary_width must be an integer >= 1, got {boundary_width}")
        if ohem_fraction is not None and not 0 < ohem_fraction <= 1:
            raise ValueError(f"ohem_fraction must be in (0, 1], got {ohem_fraction}")
        if depth_loss not in DEPTH_LOSSES:
            raise ValueError(f"depth_loss must be one of {DEPTH_LOSSES}, got {depth_loss!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if weighting == "kendall" and depth_loss == "none":
            raise ValueError("weighting='kendall' balances two tasks and needs depth_loss 'l1' or 'berhu'")
        if depth_weight < 0 or smoothness_weight < 0:
            raise ValueError(
                f"depth_weight and smoothness_weight must be >= 0, got {depth_weight}, {smoothness_weight}"
            )
        self.num_classes = num_classes
        self.boundary_weight = float(boundary_weight)
        self.boundary_width = int(boundary_width)
        self.ohem_fraction = ohem_fraction
        self.depth_loss = depth_loss
        if berhu_threshold not in BERHU_THRESHOLDS:
            raise ValueError(f"berhu_threshold must be one of {tuple(BERHU_THRESHOLDS)}, got {berhu_threshold!r}")
        self.berhu_threshold = berhu_threshold
        self.berhu_c = BERHU_THRESHOLDS[berhu_threshold] if berhu_c is None else float(berhu_c)
        self.depth_weight = float(depth_weight)
        self.weighting = weighting
        self.smoothness_weight = float(smoothness_weight)
        if distill_alpha < 0 or not distill_temperature > 0:
            raise ValueError(f"need distill_alpha >= 0 and distill_temperature > 0, got {distill_alpha}, "
                             f"{distill_temperature}")
        self.distill_alpha, self.distill_temperature = float(distill_alpha), float(distill_temperature)
        self.ignore_index = ignore_index
        weights = torch.tensor(class_weights) if class_weights is not None else torch.ones(num_classes)
        # Not persistent: it comes from the recipe, so the state dict holds only the learnt log-sigmas.
        self.register_buffer("class_weights", weights, persistent=False)
        if weighting == "kendall":
            self.log_sigma_seg = nn.Parameter(torch.zeros(()))
            self.log_sigma_depth = nn.Parameter(torch.zeros(()))

    def pixel_weights(self, label: Tensor) -> Tensor:
        """Per-pixel CE weights: class weight x (``boundary_weight`` at boundaries), 0 where ignored.

        Args:
            label: ``(B, H, W)`` integer class ids.
        """
        valid = label != self.ignore_index
        safe = torch.where(valid, label, torch.zeros_like(label))
        w = self.class_weights.to(label.device)[safe] * valid
        if self.boundary_weight != 1.0:
            edge = label_boundaries(label, self.boundary_width, self.ignore_index)
            w = torch.where(edge, w * self.boundary_weight, w)
        return w

    def seg_loss(self, seg_logits: Tensor, label: Tensor) -> Tensor:
        """Weighted-mean CE (boundary weights, hard mining); 0 with a graph when no pixel is labelled.

        Args:
            seg_logits: ``(B, C, h, w)`` logits; upsampled bilinearly to the label size when smaller.
            label: ``(B, H, W)`` integer class ids.
        """
        logits = _resize(seg_logits, tuple(label.shape[-2:]))
        per_pixel = F.cross_entropy(logits.float(), label, ignore_index=self.ignore_index, reduction="none")
        weights = self.pixel_weights(label)
        weighted = per_pixel * weights
        if self.ohem_fraction is not None and self.ohem_fraction < 1:
            valid = (label != self.ignore_index).reshape(-1)
            n_valid = int(valid.sum())
            if n_valid > 0:
                k = max(1, math.ceil(self.ohem_fraction * n_valid))
                # Ranked by the weighted loss (as mmseg's OHEM sampler); ignored pixels can never be chosen.
                scores = torch.where(valid, weighted.detach().reshape(-1), float("-inf"))
                keep = scores.topk(k).indices
                weighted = weighted.reshape(-1)[keep]
                weights = weights.reshape(-1)[keep]
        den = weights.sum()
        # den == 0 only when nothing counts, where the numerator is an exact 0 that keeps its graph.
        return weighted.sum() / torch.where(den > 0, den, torch.ones_like(den))

    def forward(
        self,
        seg_logits: Tensor,
        depth_pred: Tensor | None,
        label: Tensor,
        depth: Tensor | None = None,
        image: Tensor | None = None,
        soft: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its parts.

        Args:
            seg_logits: ``(B, C, h, w)`` segmentation logits.
            depth_pred: ``(B, 1, h, w)`` predicted depth in metres, or None when the model has no depth head.
            label: ``(B, H, W)`` class ids, ``ignore_index`` = ignore.
            depth: ``(B, 1, H, W)`` (or ``(B, H, W)``) depth in metres, 0 = missing.
            image: ``(B, 3+, H, W)`` network input; its first 3 channels drive the smoothness term.
            soft: ``(B, C, H, W)`` a teacher's probabilities (distillation), or None.

        Returns:
            ``(total, parts)``; parts holds detached 0-d float32 tensors "ce", "depth", "smooth", "total" and,
            under Kendall weighting, "sigma_seg" and "sigma_depth", with soft targets "distill"
            (:func:`parts_as_floats` reads them).
        """
        self._check_inputs(seg_logits, depth_pred, label, depth, image, soft)
        label = label.long()
        ce = self.seg_loss(seg_logits, label)
        zero = torch.zeros((), device=seg_logits.device)

        depth_term = zero
        if self.depth_loss != "none":
            if depth.dim() == 3:
                depth = depth.unsqueeze(1)
            pred = _resize(depth_pred.float(), tuple(depth.shape[-2:]))
            if self.depth_loss == "l1":
                depth_term = l1_depth_loss(pred, depth.float())
            else:
                depth_term = berhu_loss(pred, depth.float(), self.berhu_c, self.berhu_threshold)

        smooth = zero
        if self.smoothness_weight > 0:
            rgb = _resize(image[:, :3].float(), tuple(depth_pred.shape[-2:]))
            smooth = edge_aware_smoothness(depth_pred.float(), rgb)

        extra: dict[str, Tensor] = {}
        if self.weighting == "kendall":
            s_seg = torch.clamp(self.log_sigma_seg, *LOG_SIGMA_RANGE)
            s_depth = torch.clamp(self.log_sigma_depth, *LOG_SIGMA_RANGE)
            total = torch.exp(-2 * s_seg) * ce + s_seg + 0.5 * torch.exp(-2 * s_depth) * depth_term + s_depth
            extra = {"sigma_seg": torch.exp(s_seg), "sigma_depth": torch.exp(s_depth)}
        else:
            total = ce + self.depth_weight * depth_term
        total = total + self.smoothness_weight * smooth
        if soft is not None:
            extra["distill"] = soft_target_loss(seg_logits, soft, self.distill_temperature)
            total = total + self.distill_alpha * extra["distill"]

        # Tensors, not floats: reading a number off the GPU waits for it, and the training loop sums the parts
        # on the device, reading them once every few steps.
        parts = {"ce": ce, "depth": depth_term, "smooth": smooth, "total": total, **extra}
        return total, {name: value.detach().float() for name, value in parts.items()}

    def _check_inputs(
        self,
        seg_logits: Tensor,
        depth_pred: Tensor | None,
        label: Tensor,
        depth: Tensor | None,
        image: Tensor | None,
        soft: Tensor | None,
    ) -> None:
        if seg_logits.dim() != 4 or seg_logits.shape[1] != self.num_classes:
            raise ValueError(f"seg_logits must be (B, {self.num_classes}, h, w), got {tuple(seg_logits.shape)}")
        if label.dim() != 3 or label.shape[0] != seg_logits.shape[0]:
            raise ValueError(f"label must be (B, H, W) with B = {seg_logits.shape[0]}, got {tuple(label.shape)}")
        if label.dtype.is_floating_point:
            raise ValueError(f"label must be an integer tensor, got dtype {label.dtype}")
        needs_pred = self.depth_loss != "none" or self.smoothness_weight > 0
        if needs_pred and (depth_pred is None or depth_pred.dim() != 4 or depth_pred.shape[1] != 1):
            shape = None if depth_pred is None else tuple(depth_pred.shape)
            raise ValueError(
                f"depth_pred must be (B, 1, h, w) when depth_loss={self.depth_loss!r} "
                f"or smoothness_weight > 0, got {shape}"
            )
        if self.depth_loss != "none" and (
            depth is None or depth.dim() not in (3, 4) or depth.shape[0] != label.shape[0]
        ):
            shape = None if depth is None else tuple(depth.shape)
            raise ValueError(f"depth must be (B, 1, H, W) when depth_loss={self.depth_loss!r}, got {shape}")
        if soft is not None and (soft.dim() != 4 or soft.shape[:2] != seg_logits.shape[:2]):
            raise ValueError(f"soft must be (B, {self.num_classes}, H, W) teacher probabilities, "
                             f"got {tuple(soft.shape)}")
        if self.smoothness_weight > 0 and (image is None or image.dim() != 4 or image.shape[1] < 3):
            shape = None if image is None else tuple(image.shape)
            raise ValueError(f"image must be (B, 3+, H, W) when smoothness_weight > 0, got {shape}")


def soft_target_loss(seg_logits: Tensor, soft: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 x KL(teacher || student) per covered pixel, averaged over them (Hinton et al. 2015, per pixel).

    Args:
        seg_logits: ``(B, C, h, w)`` student logits; resized bilinearly to the targets' size when they differ.
        soft: ``(B, C, H, W)`` teacher probabilities; a pixel whose probabilities sum to 0 is not covered (one an
            augmentation invented, or a pseudo-label below ``distill.min_confidence``) and counts for nothing.
        temperature: T of both softmaxes; the T^2 keeps the gradient's size independent of T.

    Returns:
        A 0-d tensor (0 with a graph when no pixel is covered).
    """
    logits = _resize(seg_logits.float(), tuple(soft.shape[-2:]))
    covered = soft.float().sum(1) > 0
    teacher = apply_temperature(soft, temperature, dim=1)  # float32; at T < 1 a tiny probability becomes 0
    log_student = F.log_softmax(logits / temperature, dim=1)
    # kl_div takes 0 x log 0 as 0 (xlogy): a teacher probability of exactly 0 adds nothing rather than nan.
    per_pixel = F.kl_div(log_student, teacher, reduction="none").sum(1) * covered
    den = covered.sum()
    return per_pixel.sum() / torch.where(den > 0, den, torch.ones_like(den)) * temperature**2


def parts_as_floats(parts: dict[str, Tensor]) -> dict[str, float]:
    """The loss parts as python floats, read off their device in one transfer."""
    return dict(zip(parts, torch.stack(list(parts.values())).tolist()))
