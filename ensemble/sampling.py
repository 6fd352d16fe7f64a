"""A fixed, class-stratified sample of labelled pixels for fast blend optimisation.

Optimising blend weights on every pixel of the OOF store (400 images x 240 x 320 = 30M pixels per model)
is slow, so weights are fitted on a few hundred thousand pixels. Sampling the same number of pixels per
class keeps rare classes (tv, books) in the sample; the class frequencies of the population are restored
by per-pixel weights = (class count in population) / (class count in sample), so the weighted confusion
matrix of the sample is an unbiased estimate of the population's one (stratified sampling by target row).
"""

from __future__ import annotations

import numpy as np


def stratified_pixel_sample(
    labels: np.ndarray, num_classes: int, n_pixels: int, seed: int = 0, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of a class-stratified sample of labelled pixels and their population weights.

    Each class keeps at most ``n_pixels // num_classes`` pixels drawn uniformly without replacement;
    a class with fewer pixels keeps them all. ``ignore_index`` pixels are never drawn.

    Args:
        labels: (N, H, W) uint8 class ids (or any shape: indices are into ``labels.ravel()``).
        num_classes: number of classes C; other values than [0, C) and ``ignore_index`` are an error.
        n_pixels: total sample budget (>= num_classes).
        seed: the sample is a function of (labels, num_classes, n_pixels, seed) only.
        ignore_index: label value that is never sampled.

    Returns:
        (indices, weights): sorted int64 flat indices (P,) and float64 weights (P,) with
        weight = population count of the pixel's class / sample count of that class.
    """
    if n_pixels < num_classes:
        raise ValueError(f"n_pixels={n_pixels} must be >= num_classes={num_classes}")
    flat = np.asarray(labels).ravel()
    valid = flat != ignore_index
    bad = valid & (flat >= num_classes)
    if bad.any():
        raise ValueError(f"label value {int(flat[bad][0])} outside [0, {num_classes}) and not {ignore_index}")
    cap = n_pixels // num_classes
    rng = np.random.default_rng(seed)
    # A stable sort groups pixels by class in index order, so the draw depends on the seed only.
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat[valid], minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)])
    picked, weights = [], []
    for c in range(num_classes):
        n_c = int(counts[c])
        if n_c == 0:
            continue
        members = order[starts[c] : starts[c] + n_c]
        take = min(cap, n_c)
        idx = members if take == n_c else members[rng.choice(n_c, size=take, replace=False)]
        picked.append(idx)
        weights.append(np.full(take, n_c / take))
    if not picked:
        raise ValueError("no labelled pixels to sample: every label is ignore_index")
    indices = np.concatenate(picked).astype(np.int64)
    w = np.concatenate(weights)
    keep = np.argsort(indices)  # sorted indices read memory-mapped stores front to back
    return indices[keep], w[keep]


def pixel_image_index(indices: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Image number of each flat pixel index into an (N, H, W) label array.

    Args:
        indices: flat indices from ``stratified_pixel_sample``.
        image_size: (H, W) of the label images.
    """
    return np.asarray(indices, dtype=np.int64) // (image_size[0] * image_size[1])


def _source_coords(dst: np.ndarray, in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # torch's bilinear rule for align_corners=False with an explicit output size.
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def gather_pixels(probs: np.ndarray, indices: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Class probabilities at sampled full-resolution pixels, bilinearly upsampled from a stored scale.

    Equals ``F.interpolate(probs, size=image_size, mode="bilinear", align_corners=False)`` read at the
    sampled pixels, without materialising the full-resolution array (``probs`` may be a memmap).

    Args:
        probs: (N, C, h, w) probabilities (float16 OOF store) at any scale of the labels.
        indices: flat indices into (N, H, W) labels, e.g. from ``stratified_pixel_sample``.
        image_size: (H, W) of the labels.

    Returns:
        float32 (P, C).
    """
    if probs.ndim != 4:
        raise ValueError(f"probs must be (N, C, h, w), got shape {probs.shape}")
    height, width = image_size
    n_img, _, h, w = probs.shape
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_img * height * width):
        raise ValueError(f"pixel index out of range for {n_img} images of size {height}x{width}")
    img, rem = np.divmod(idx, height * width)
    y, x = np.divmod(rem, width)
    y0, y1, ly = _source_coords(y, h, height)
    x0, x1, lx = _source_coords(x, w, width)
    ly, lx = ly[:, None], lx[:, None]

    def corner(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return np.asarray(probs[img, :, yy, xx], dtype=np.float32)  # (P, C)

    top = corner(y0, x0) * (1 - lx) + corner(y0, x1) * lx
    bottom = corner(y1, x0) * (1 - lx) + corner(y1, x1) * lx
    return top * (1 - ly) + bottom * ly
