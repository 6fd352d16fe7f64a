"""Run-length encoding of binary masks: space-separated ``start length`` pairs, 1-indexed.

Pixels are numbered over the flattened image in row-major (``"C"``) or column-major (``"F"``)
order; an absent class is the empty string. Encode and decode round-trip exactly.
"""

from __future__ import annotations

import re

import numpy as np

from submissions.common import SubmissionError

ORDERS = ("C", "F")
INTEGER_RE = re.compile(r"[+-]?[0-9]{1,18}")
_DIGITS_AND_SPACES = re.compile(r"[0-9\s]*")
_TOO_LONG = re.compile(r"[0-9]{19}")


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise SubmissionError(f"order must be 'C' (row-major) or 'F' (column-major), got {order!r}")


def _format_runs(starts: np.ndarray, lengths: np.ndarray) -> str:
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = starts
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


def rle_encode(mask: np.ndarray, order: str = "C") -> str:
    """Encode a binary mask.

    Args:
        mask: (H, W) array; non-zero / True pixels are in the mask.
        order: ``"C"`` (row-major) or ``"F"`` (column-major) pixel numbering.

    Returns:
        ``"start length start length ..."`` with 1-indexed starts, or ``""`` for an empty mask.
    """
    check_order(order)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise SubmissionError(f"rle_encode expects a 2-D (H, W) mask, got shape {mask.shape}")
    flat = mask.ravel(order=order).astype(bool)
    # Padding with False on both sides makes every run open and close inside the array.
    padded = np.concatenate(([False], flat, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-indexed run starts / exclusive ends
    starts, ends = edges[0::2], edges[1::2]
    return _format_runs(starts, ends - starts)


def encode_class_map(class_map: np.ndarray, num_classes: int, order: str = "C") -> list[str]:
    """Encode every class of a class map in one pass.

    Equal to ``[rle_encode(class_map == c, order) for c in range(num_classes)]`` but scans the image
    once: runs of constant value never touch a run of the same value, so they are the class runs.

    Args:
        class_map: (H, W) integer class ids in ``[0, num_classes)``.
        num_classes: number of classes.
        order: ``"C"`` or ``"F"``.
    """
    check_order(order)
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise SubmissionError(f"class map must be 2-D (H, W), got shape {class_map.shape}")
    flat = class_map.ravel(order=order)
    if flat.size == 0:
        return [""] * num_classes
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    values = flat[starts]
    return [_format_runs(starts[values == c] + 1, lengths[values == c]) for c in range(num_classes)]


def parse_runs(rle: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check an RLE string against an image of ``size`` pixels.

    Returns:
        (starts, lengths) int64 arrays, starts 1-indexed.

    Raises:
        SubmissionError: odd number of values, non-integer value, start < 1, length < 1, a run past
            the last pixel, runs that overlap or are not in increasing order.
    """
    tokens = rle.split()
    if len(tokens) % 2:
        raise SubmissionError(f"RLE has an odd number of values ({len(tokens)}); expected start length pairs")
    # Stricter than int(): no "1_000", "1.0" or non-ASCII digits. One regex over the whole string
    # first; the per-token scan (slow on long strings) only runs to name the bad value.
    if not _DIGITS_AND_SPACES.fullmatch(rle) or _TOO_LONG.search(rle):
        bad = next((t for t in tokens if not INTEGER_RE.fullmatch(t)), None)
        if bad is not None:
            raise SubmissionError(f"RLE value {bad!r} is not an integer (at most 18 digits)")
    values = np.array(tokens, dtype=np.int64) if tokens else np.zeros(0, dtype=np.int64)
    starts, lengths = values[0::2], values[1::2]
    if (starts < 1).any():
        raise SubmissionError(f"RLE start {int(starts[starts < 1][0])} is < 1 (starts are 1-indexed)")
    if (lengths < 1).any():
        i = int(np.flatnonzero(lengths < 1)[0])
        raise SubmissionError(
            f"RLE run at start {int(starts[i])} has length {int(lengths[i])} (must be >= 1)"
        )
    ends = starts + lengths  # exclusive, 1-indexed
    if (ends > size + 1).any():
        i = int(np.flatnonzero(ends > size + 1)[0])
        raise SubmissionError(
            f"RLE run {int(starts[i])} {int(lengths[i])} ends at pixel {int(ends[i]) - 1}, "
            f"past the last pixel {size}"
        )
    if len(starts) > 1 and (starts[1:] < ends[:-1]).any():
        i = int(np.flatnonzero(starts[1:] < ends[:-1])[0])
        raise SubmissionError(
            f"RLE runs overlap or are unsorted: run {int(starts[i + 1])} {int(lengths[i + 1])} "
            f"starts before the end of run {int(starts[i])} {int(lengths[i])}"
        )
    return starts, lengths


def rle_decode(rle: str, shape: tuple[int, int], order: str = "C") -> np.ndarray:
    """Decode an RLE string into a boolean mask.

    Args:
        rle: ``"start length ..."`` (1-indexed starts); ``""`` decodes to an empty mask.
        shape: (H, W) of the image.
        order: ``"C"`` or ``"F"``, the order used to encode.

    Returns:
        (H, W) bool mask.

    Raises:
        SubmissionError: malformed string (see ``parse_runs``).
    """
    check_order(order)
    if len(shape) != 2:
        raise SubmissionError(f"shape must be (H, W), got {shape}")
    size = int(shape[0]) * int(shape[1])
    starts, lengths = parse_runs(rle, size)
    # +1 at every run start, -1 after every run end; touching runs are fine with bincount.
    delta = np.bincount(starts - 1, minlength=size + 1)
    delta -= np.bincount(starts - 1 + lengths, minlength=size + 1)
    return (np.cumsum(delta[:size]) > 0).reshape(shape, order=order)
