"""Small tensor helpers of test-time augmentation: sizes, padding, output parsing, temperature."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

# log() floor for stored probabilities: float16 underflows to exact zeros, and log(0) = -inf would turn a
# flattening temperature (T > 1) into nan where every class of a pixel is tiny.
_PROB_FLOOR = 1e-30


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size of an image of `size` (H, W) resized by `scale`, rounded half up (mmcv's `rescale_size`).

    Args:
        size: (H, W) of the base image.
        scale: positive scale factor.
    """
    if not scale > 0:
        raise ValueError(f"TTA scale must be > 0, got {scale!r}")
    return tuple(max(1, int(s * scale + 0.5)) for s in size)  # type: ignore[return-value]


def pad_to_stride(x: Tensor, stride: int) -> Tensor:
    """Pad (B, C, H, W) at the bottom and right with reflection so that H and W are multiples of `stride`.

    Reflect padding needs pad < size; a pad larger than the image is done in several reflections (the image
    grows each time), and a side of length 1 (nothing to reflect) falls back to replicate padding.

    Args:
        x: batch of images (B, C, H, W).
        stride: output stride of the encoder (32 for the usual smp encoders).
    """
    if stride < 1:
        raise ValueError(f"TTA stride must be >= 1, got {stride!r}")
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % stride, (-w) % stride
    while pad_h > 0 or pad_w > 0:
        h, w = x.shape[-2:]
        step_h, step_w = min(pad_h, h - 1), min(pad_w, w - 1)
        if (pad_h > 0 and step_h == 0) or (pad_w > 0 and step_w == 0):
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


def split_output(out: object) -> tuple[Tensor, Tensor | None]:
    """Segmentation logits and optional depth of a model output.

    Args:
        out: logits (B, K, h, w), a tuple/list `(logits, depth)`, or a mapping with key "seg" and
            optionally "depth"; depth is (B, 1, h, w) or None.
    """
    if isinstance(out, Tensor):
        seg, depth = out, None
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        seg, depth = out
    elif isinstance(out, Mapping):
        if "seg" not in out:
            raise KeyError(f"model output dict has no 'seg' key (keys: {sorted(out)})")
        seg, depth = out["seg"], out.get("depth")
    else:
        raise TypeError(f"model output must be a Tensor, (logits, depth) or dict with 'seg', got {type(out)}")
    if not isinstance(seg, Tensor) or seg.ndim != 4:
        shape = getattr(seg, "shape", type(seg))
        raise ValueError(f"segmentation logits must be a (B, K, h, w) tensor, got {shape}")
    if depth is not None and (not isinstance(depth, Tensor) or depth.ndim != 4 or depth.shape[1] != 1):
        shape = getattr(depth, "shape", type(depth))
        raise ValueError(f"depth output must be a (B, 1, h, w) tensor, got {shape}")
    return seg, depth


def crop_padding(y: Tensor, valid: tuple[int, int], padded: tuple[int, int]) -> Tensor:
    """Crop the bottom/right padding off a model output `y` computed on an input of size `padded`.

    An output at a lower resolution than its input (e.g. logits at 1/4) keeps the proportional part,
    rounded up.

    Args:
        y: model output (B, C, h, w).
        valid: (H, W) of the input before padding.
        padded: (H, W) of the padded input.
    """
    out_h, out_w = y.shape[-2:]
    keep_h = min(out_h, math.ceil(valid[0] * out_h / padded[0]))
    keep_w = min(out_w, math.ceil(valid[1] * out_w / padded[1]))
    return y[..., :keep_h, :keep_w]


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of (B, C, h, w) to `size`; a no-op when already that size.

    Args:
        x: tensor (B, C, h, w).
        size: target (H, W).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def apply_temperature(probs: Tensor, temperature: float, dim: int = 1) -> Tensor:
    """Re-temper stored probabilities: p^(1/T) renormalised over `dim`, i.e. softmax(log p / T).

    For p = softmax(logits) this equals softmax(logits / T). Computed in float32 log space with a floor,
    so float16 inputs holding exact zeros give finite results that sum to 1.

    Args:
        probs: probabilities, classes along `dim` (any float dtype).
        temperature: T > 0; T < 1 sharpens, T > 1 flattens.
        dim: class dimension.

    Returns:
        float32 tensor of the same shape.
    """
    return tempered_from_log(log_probs(probs), temperature, dim)


def log_probs(probs: Tensor) -> Tensor:
    """float32 log of stored probabilities with a floor (the first half of :func:`apply_temperature`)."""
    return probs.float().clamp_min(_PROB_FLOOR).log()


def tempered_from_log(logp: Tensor, temperature: float, dim: int = 1) -> Tensor:
    """softmax(logp / T) over ``dim``: :func:`apply_temperature` from :func:`log_probs`, for re-tempering the
    same probabilities at several temperatures with one log."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return torch.softmax(logp / temperature, dim=dim)
