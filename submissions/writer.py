"""Write a submission CSV from per-image class maps, validated first, written atomically.

Default format: ``ImageId,ClassId,EncodedPixels``, one row per image and class, sorted by id then
class, empty ``EncodedPixels`` for an absent class. A ``sample_submission.csv`` wins: its columns
(the first three play ImageId, ClassId, EncodedPixels), ids and row order are followed.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from submissions.common import SubmissionError, atomic_path
from submissions.rle import check_order, encode_class_map
from submissions.validate import (
    COLUMNS,
    check_ids,
    first_few,
    group_rows,
    read_submission,
    role_columns,
    validate_submission,
)

__all__ = ["SubmissionSummary", "write_submission", "validate_submission", "encode_predictions"]


@dataclass(frozen=True)
class SubmissionSummary:
    """What ``write_submission`` wrote (or would write, with ``dry_run``).

    Attributes:
        path: the destination CSV.
        written: False for a dry run.
        n_images / n_rows: images and CSV rows (header excluded).
        num_classes / order: as given.
        columns: the CSV header.
        image_shape: the (H, W) shared by every image, None when the sizes differ.
        class_pixels: predicted pixels of each class over all images.
    """

    path: Path
    written: bool
    n_images: int
    n_rows: int
    num_classes: int
    order: str
    columns: tuple[str, ...]
    image_shape: tuple[int, int] | None
    class_pixels: tuple[int, ...]


def _check_class_map(image_id: object, class_map: np.ndarray, num_classes: int, source: str) -> None:
    if not isinstance(image_id, str) or not image_id:
        raise SubmissionError(f"{source}: image id must be a non-empty string, got {image_id!r}")
    if class_map.ndim != 2:
        raise SubmissionError(
            f"{source}: prediction {image_id!r} must be (H, W), got shape {class_map.shape}"
        )
    if class_map.dtype.kind not in "ui":
        raise SubmissionError(
            f"{source}: prediction {image_id!r} must hold integer class ids, got dtype {class_map.dtype}"
        )
    if class_map.size and (class_map.min() < 0 or class_map.max() >= num_classes):
        bad = class_map[(class_map < 0) | (class_map >= num_classes)][0]
        raise SubmissionError(
            f"{source}: prediction {image_id!r} has class id {int(bad)} outside [0, {num_classes})"
        )


def encode_predictions(
    predictions: Iterable[tuple[str, np.ndarray]],
    num_classes: int,
    order: str = "C",
    source: str = "submission",
) -> tuple[dict[str, list[str]], set[tuple[int, int]], np.ndarray]:
    """Encode class maps one at a time, keeping only the RLE strings.

    Returns:
        (id -> one RLE string per class, set of image shapes, predicted pixels per class).
    """
    encoded: dict[str, list[str]] = {}
    shapes: set[tuple[int, int]] = set()
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    for image_id, class_map in predictions:
        class_map = np.asarray(class_map)
        _check_class_map(image_id, class_map, num_classes, source)
        if image_id in encoded:
            raise SubmissionError(f"{source}: image id {image_id!r} predicted twice")
        encoded[image_id] = encode_class_map(class_map, num_classes, order)
        shapes.add(class_map.shape)
        class_pixels += np.bincount(class_map.ravel(), minlength=num_classes)[:num_classes]
    if not encoded:
        raise SubmissionError(f"{source}: no predictions to write")
    return encoded, shapes, class_pixels


def _sample_rows(
    sample_path: Path, encoded: dict[str, list[str]], num_classes: int
) -> tuple[list[str], list[list[str]]]:
    sample = read_submission(sample_path)
    source = str(sample_path)
    id_col, class_col, rle_col = role_columns(sample, source)
    sample_ids = set(sample[id_col].tolist())
    missing, unknown = sample_ids - set(encoded), set(encoded) - sample_ids
    if missing:
        raise SubmissionError(
            f"{source}: {len(missing)} sample id(s) have no prediction: {first_few(missing)}"
        )
    if unknown:
        raise SubmissionError(
            f"{source}: {len(unknown)} predicted id(s) are not in the sample: {first_few(unknown)}"
        )
    group_rows(sample, sample_ids, num_classes, source)  # class ids valid, no duplicate rows
    header = [str(c) for c in sample.columns]
    i_id, i_class, i_rle = (header.index(c) for c in (id_col, class_col, rle_col))
    rows = sample.values.tolist()
    for row in rows:
        row[i_rle] = encoded[row[i_id]][int(row[i_class])]
    return header, rows


def write_submission(
    path: str | os.PathLike,
    predictions: Iterable[tuple[str, np.ndarray]],
    num_classes: int,
    order: str = "C",
    sample_submission: str | os.PathLike | None = None,
    expected_ids: Sequence[str] | None = None,
    dry_run: bool = False,
) -> SubmissionSummary:
    """Validate and write a submission CSV.

    Every check runs before anything is written, and the CSV appears under its final name only when
    whole (temporary file in the same folder, then rename). Class maps are consumed one at a time:
    only their RLE strings are kept, so ``predictions`` can be a generator over a large test set.
    No pixel can be in two classes: each pixel of a class map holds exactly one class id.

    Args:
        path: destination CSV.
        predictions: (image id, (H, W) integer class map with ids in ``[0, num_classes)``) pairs.
        num_classes: number of classes; every class gets a row per image in the default format.
        order: ``"C"`` (row-major) or ``"F"`` (column-major) RLE pixel order.
        sample_submission: a ``sample_submission.csv`` whose columns, ids and row order are followed;
            its ids must equal the predicted ids.
        expected_ids: when given, the predicted ids must be exactly these.
        dry_run: validate and summarise without writing.

    Raises:
        SubmissionError: bad class map, duplicate / missing / unknown id, bad sample submission.
    """
    check_order(order)
    if num_classes < 1:
        raise SubmissionError(f"num_classes must be >= 1, got {num_classes}")
    path = Path(path)
    source = str(path)
    encoded, shapes, class_pixels = encode_predictions(predictions, num_classes, order, source)
    if expected_ids is not None:
        check_ids(encoded, [str(i) for i in expected_ids], source)
    if sample_submission is not None:
        header, rows = _sample_rows(Path(sample_submission), encoded, num_classes)
    else:
        header = list(COLUMNS)
        rows = [[i, str(c), encoded[i][c]] for i in sorted(encoded) for c in range(num_classes)]
    if not dry_run:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    return SubmissionSummary(
        path=path,
        written=not dry_run,
        n_images=len(encoded),
        n_rows=len(rows),
        num_classes=num_classes,
        order=order,
        columns=tuple(header),
        image_shape=next(iter(shapes)) if len(shapes) == 1 else None,
        class_pixels=tuple(int(n) for n in class_pixels),
    )
