"""Read and check a submission CSV: columns, ids, class ids, duplicates, RLE runs, overlaps.

Used by the scorer (``submissions.score``) and by code that wants to check a CSV it did not write.
Every problem is a ``SubmissionError`` whose one-line message names the source, line, id and value.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from submissions.common import SubmissionError
from submissions.rle import INTEGER_RE, check_order, parse_runs

COLUMNS = ("ImageId", "ClassId", "EncodedPixels")
Rows = list[tuple[int, int, str]]  # (CSV line, class id, RLE) of one image


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """Read a submission CSV with every cell as a string (empty cells stay ``""``).

    ``df.attrs["lines"]`` holds the file line of each row (1 = header) for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: submission file not found")
    # The csv module rather than pandas: pandas silently turns extra fields into an index.
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if not header:
                raise SubmissionError(f"{path}: empty file (expected a header {','.join(COLUMNS)})")
            rows, lines = [], []
            line = reader.line_num + 1
            for row in reader:
                if row:  # blank lines are skipped
                    if len(row) != len(header):
                        raise SubmissionError(
                            f"{path}: not a readable CSV: line {line} has {len(row)} fields, "
                            f"the header has {len(header)}"
                        )
                    rows.append(row)
                    lines.append(line)
                line = reader.line_num + 1
    except (csv.Error, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable CSV: {' '.join(str(e).split())}") from None
    df = pd.DataFrame(rows, columns=header, dtype=object)
    df.attrs["lines"] = lines  # file line of each row, for messages
    return df


def role_columns(df: pd.DataFrame, source: str = "submission") -> tuple[str, str, str]:
    """Names of the columns playing ImageId, ClassId and EncodedPixels.

    The standard names when present; a CSV that uses none of them (a competition's own
    ``sample_submission.csv``) has its first three columns play the roles, in order.
    """
    columns = [str(c) for c in df.columns]
    present = [c for c in COLUMNS if c in columns]
    if len(present) == len(COLUMNS):
        return COLUMNS
    if not present and len(columns) >= 3:
        return columns[0], columns[1], columns[2]
    missing = [c for c in COLUMNS if c not in columns]
    raise SubmissionError(f"{source}: missing column(s) {', '.join(missing)} (found {', '.join(columns)})")


def first_few(items: Iterable[str], n: int = 5) -> str:
    items = sorted(items)
    more = f" ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_ids(found: Iterable[str], expected: Iterable[str], source: str, what: str = "expected") -> None:
    """Raise when ``found`` ids differ from ``expected`` ids, naming the first few missing / unknown."""
    found, expected = set(found), set(expected)
    missing, unknown = expected - found, found - expected
    if missing:
        raise SubmissionError(f"{source}: {len(missing)} {what} id(s) have no rows: {first_few(missing)}")
    if unknown:
        raise SubmissionError(f"{source}: {len(unknown)} unknown id(s): {first_few(unknown)}")


def group_rows(
    df: pd.DataFrame, ids: Iterable[str], num_classes: int, source: str = "submission"
) -> dict[str, Rows]:
    """Check the table (not the RLE strings) and group its rows by image id.

    Args:
        df: the submission, every cell a string (see ``read_submission``).
        ids: the image ids that must appear, no more, no fewer.
        num_classes: class ids must be integers in ``[0, num_classes)``.
        source: name used in messages (the file path).

    Returns:
        image id -> [(CSV line, class id, RLE string)], lines counted from 1 = the header.
    """
    id_col, class_col, rle_col = role_columns(df, source)
    known = set(ids)
    groups: dict[str, Rows] = {}
    seen: dict[tuple[str, int], int] = {}
    lines = df.attrs.get("lines")
    if lines is None or len(lines) != len(df):
        lines = range(2, len(df) + 2)  # a frame not from read_submission: header + row number
    for line, image_id, class_text, rle in zip(
        lines, df[id_col].tolist(), df[class_col].tolist(), df[rle_col].tolist()
    ):
        # Cells may come from pd.read_csv (ints, nan for empty) rather than read_submission.
        image_id, class_text = str(image_id), str(class_text)
        rle = "" if rle is None or (isinstance(rle, float) and rle != rle) else str(rle)
        if image_id not in known:
            raise SubmissionError(f"{source}: line {line}: unknown {id_col} {image_id!r}")
        if not INTEGER_RE.fullmatch(class_text.strip()):
            raise SubmissionError(
                f"{source}: line {line} ({image_id}): {class_col} {class_text!r} is not an integer"
            )
        class_id = int(class_text)
        if not 0 <= class_id < num_classes:
            raise SubmissionError(
                f"{source}: line {line} ({image_id}): {class_col} {class_id} outside [0, {num_classes})"
            )
        if (image_id, class_id) in seen:
            raise SubmissionError(
                f"{source}: line {line}: duplicate row for {id_col} {image_id!r} {class_col} {class_id} "
                f"(first on line {seen[image_id, class_id]})"
            )
        seen[image_id, class_id] = line
        groups.setdefault(image_id, []).append((line, class_id, rle))
    check_ids(groups, known, source)
    return groups


def decode_image(
    rows: Rows, shape: tuple[int, int], num_classes: int, order: str = "C",
    source: str = "submission", image_id: str = "",
) -> np.ndarray:
    """Decode the rows of one image into a class map, checking runs and overlaps.

    Args:
        rows: the image's (CSV line, class id, RLE) rows, as ``group_rows`` returns them.
        shape: (H, W) of the image.
        num_classes: number of classes (also the value of unclaimed pixels).
        order: RLE pixel order, ``"C"`` or ``"F"``.
        source / image_id: names used in messages.

    Returns:
        (H, W) uint8 (int64 past 255 classes) class ids; ``num_classes`` where no class claims the pixel.
    """
    check_order(order)
    size = int(shape[0]) * int(shape[1])
    starts, lengths, classes = [], [], []
    for line, class_id, rle in rows:
        try:
            s, n = parse_runs(rle, size)
        except SubmissionError as e:
            raise SubmissionError(f"{source}: line {line} ({image_id}, class {class_id}): {e}") from None
        starts.append(s)
        lengths.append(n)
        classes.append(np.full(len(s), class_id, dtype=np.int64))
    flat = np.full(size, num_classes, dtype=np.uint8 if num_classes < 255 else np.int64)
    if not rows or not sum(len(s) for s in starts):
        return flat.reshape(shape, order=order)
    # All runs of the image sorted by start: a run that starts before the furthest end so far overlaps.
    by_start = np.argsort(np.concatenate(starts), kind="stable")
    s, n, c = (np.concatenate(a)[by_start] for a in (starts, lengths, classes))
    ends = s + n
    clash = np.flatnonzero(s[1:] < np.maximum.accumulate(ends)[:-1])
    if len(clash):
        pixel = int(s[clash[0] + 1])  # the smallest pixel claimed twice
        owners = sorted(set(c[(s <= pixel) & (pixel < ends)].tolist()))
        raise SubmissionError(
            f"{source}: image {image_id!r}: pixel {pixel} (order {order}) is claimed by classes "
            f"{', '.join(map(str, owners))}"
        )
    flat[np.repeat(s - 1, n) + _ramp(n)] = np.repeat(c, n)
    return flat.reshape(shape, order=order)


def _ramp(lengths: np.ndarray) -> np.ndarray:
    # 0, 1, ..., len-1 for every run, concatenated: offsets of the pixels inside their run.
    ends = np.cumsum(lengths)
    return np.arange(ends[-1]) - np.repeat(ends - lengths, lengths)


def validate_submission(
    df: pd.DataFrame, shapes: Mapping[str, tuple[int, int]], num_classes: int, order: str = "C",
    source: str = "submission",
) -> None:
    """Check a whole submission: columns, ids, class ids, duplicates, RLE strings, runs in bounds, overlaps.

    Args:
        df: the submission with string cells (``read_submission``).
        shapes: image id -> (H, W) for every image that must appear.
        num_classes: number of classes.
        order: pixel order of the RLE, ``"C"`` or ``"F"``.
        source: name used in messages.

    Raises:
        SubmissionError: the first problem found.
    """
    groups = group_rows(df, shapes.keys(), num_classes, source)
    for image_id in sorted(groups):
        decode_image(groups[image_id], shapes[image_id], num_classes, order, source, image_id)
