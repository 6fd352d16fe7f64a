"""Multi-scale x horizontal-flip test-time augmentation for segmentation (+ optional depth) models.

Conventions follow mmsegmentation's `aug_test`: every view's logits are resized back to the base size,
then softmaxed (with temperature T), and the probabilities are averaged over views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tta.functional import crop_padding, pad_to_stride, resize, scaled_size, split_output


@dataclass(frozen=True)
class TTAConfig:
    """Views and batching of test-time augmentation.

    Args:
        scales: scale factors of the views (the reference recipe uses 0.5, 0.75, 1.0, 1.25, 1.5).
        hflip: also run every scale horizontally flipped.
        stride: output stride of the encoder; views are reflect-padded (bottom/right) to a multiple of it.
        max_batch: at most this many images per forward pass.
        temperatures: softmax temperatures; merged probabilities are returned for each.
    """

    scales: tuple[float, ...] = (1.0,)
    hflip: bool = True
    stride: int = 32
    max_batch: int = 8
    temperatures: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML) but store tuples so the config stays hashable.
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        if not self.scales or any(not s > 0 for s in self.scales):
            raise ValueError(f"TTAConfig.scales must be non-empty and > 0, got {self.scales}")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise ValueError(f"TTAConfig.temperatures must be non-empty and > 0, got {self.temperatures}")
        if self.stride < 1:
            raise ValueError(f"TTAConfig.stride must be >= 1, got {self.stride}")
        if self.max_batch < 1:
            raise ValueError(f"TTAConfig.max_batch must be >= 1, got {self.max_batch}")

    @property
    def num_views(self) -> int:
        return len(self.scales) * (2 if self.hflip else 1)


@dataclass
class TTAOutput:
    """Merged predictions of `predict_tta`.

    Args:
        probs: temperature -> float32 probabilities (B, K, H', W').
        depth: float32 depth averaged over views (B, 1, H', W'), or None when the model predicts none.
    """

    probs: dict[float, Tensor]
    depth: Tensor | None


@torch.no_grad()
def predict_tta(
    model: Callable[[Tensor], object],
    images: Tensor,
    cfg: TTAConfig | None = None,
    out_size: tuple[int, int] | None = None,
) -> TTAOutput:
    """Predict a batch with scale x flip TTA; one model pass serves every temperature.

    The model's train/eval state is left as the caller set it (call `model.eval()` first).

    Args:
        model: returns logits (B, K, h, w), `(logits, depth)` or {"seg": logits, "depth": depth}; depth is
            (B, 1, h, w). Outputs may be at a lower resolution than the input.
        images: batch (B, C, H, W); (H, W) is the base size every view is merged at.
        cfg: TTA settings; default: scale 1 with horizontal flip.
        out_size: (H', W') to resize the merged probabilities and depth to (bilinear); default (H, W).

    Returns:
        TTAOutput with probabilities per temperature and the merged depth (or None).
    """
    cfg = cfg or TTAConfig()
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = getattr(images, "shape", type(images))
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    batch = images.shape[0]
    base = (int(images.shape[-2]), int(images.shape[-1]))
    flips = (False, True) if cfg.hflip else (False,)
    probs: dict[float, Tensor] = {}
    depth_sum: Tensor | None = None

    for scale in cfg.scales:
        size = scaled_size(base, scale)
        scaled = resize(images, size)
        # Flipped and unflipped views of one scale share forward passes: row i is image i % batch,
        # flipped when i >= batch.
        views = pad_to_stride(torch.cat([scaled.flip(-1) if f else scaled for f in flips]), cfg.stride)
        padded = (int(views.shape[-2]), int(views.shape[-1]))
        for start in range(0, views.shape[0], cfg.max_batch):
            stop = min(start + cfg.max_batch, views.shape[0])
            seg, depth = split_output(model(views[start:stop]))
            if seg.shape[0] != stop - start:
                raise ValueError(f"model returned batch {seg.shape[0]} for an input batch of {stop - start}")
            # Rows at or past ``batch`` are the flipped views: in a chunk they are its last rows, and each part
            # maps to a contiguous range of images, so it is added with a slice (no index gather).
            unflipped = max(0, min(stop, batch) - start)
            parts = _image_ranges(start, stop, batch)
            seg = _unview(seg, size, padded, base, unflipped)
            for t in cfg.temperatures:
                if t not in probs:
                    probs[t] = seg.new_zeros((batch, *seg.shape[1:]))
                _add_rows(probs[t], torch.softmax(seg if t == 1.0 else seg / t, dim=1), parts)
            if depth is not None:
                depth = _unview(depth, size, padded, base, unflipped)
                if depth_sum is None:
                    depth_sum = depth.new_zeros((batch, *depth.shape[1:]))
                _add_rows(depth_sum, depth, parts)

    target = out_size or base
    merged = {t: resize(p / cfg.num_views, target) for t, p in probs.items()}
    merged_depth = None if depth_sum is None else resize(depth_sum / cfg.num_views, target)
    return TTAOutput(probs=merged, depth=merged_depth)


def _image_ranges(start: int, stop: int, batch: int) -> list[tuple[int, int, int]]:
    """(first chunk row, first image, count) of each run of a chunk's rows that maps to consecutive images."""
    out = []
    for lo, hi in ((start, min(stop, batch)), (max(start, batch), stop)):
        if hi > lo:
            out.append((lo - start, lo if lo < batch else lo - batch, hi - lo))
    return out


def _add_rows(acc: Tensor, rows: Tensor, parts: list[tuple[int, int, int]]) -> None:
    for row, image, count in parts:
        acc[image : image + count] += rows[row : row + count]


def _unview(y: Tensor, valid: tuple[int, int], padded: tuple[int, int], base: tuple[int, int], unflipped: int
            ) -> Tensor:
    """Undo one chunk's view: crop the padding, resize to the base size, flip the last rows back.

    The flipped rows are a suffix of the chunk, so they are flipped back in place: no copy of the chunk and
    no boolean gather / scatter (those made TTA slower than ttach's one-pass-per-view loop).

    Args:
        unflipped: how many leading rows are unflipped views; the rest are flipped.
    """
    y = resize(crop_padding(y.float(), valid, padded), base)
    if unflipped < y.shape[0]:  # may write into the model's own output: predict_tta does not read it again
        y[unflipped:] = y[unflipped:].flip(-1)
    return y
