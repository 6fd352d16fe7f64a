"""Local leaderboard score of a submission CSV against label PNGs.

    python -m submissions.score SUB.csv --labels DIR [--order C|F] [--num-classes 13 | --classes classes.txt]
                                [--class-map nyu13_to_6]

mIoU convention (docs/ARCHITECTURE.md): one confusion matrix over all images, pixels labelled 255
dropped, mean IoU over classes with a non-zero union. A pixel that no class claims counts as the
prediction "none", wrong for any labelled pixel. Exit codes: 0 ok, 2 bad input (one-line message).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from foldwise import labels
from foldwise.classmap import ClassMap, read_class_map
from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.io import read_text
from submissions.common import (
    DEFAULT_CLASSES,
    SubmissionError,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)
from submissions.validate import decode_image, group_rows, read_submission


def read_label(path: Path, num_classes: int) -> np.ndarray:
    """Read an 8-bit label PNG; values must be in ``[0, num_classes)`` or 255 (a SubmissionError otherwise)."""
    return labels.read_label(path, num_classes, SubmissionError)


def label_ids(labels_dir: Path) -> list[str]:
    """Sorted image ids of ``labels_dir/<id>.png``."""
    if not labels_dir.is_dir():
        raise SubmissionError(f"{labels_dir}: labels folder not found")
    ids = sorted(p.stem for p in labels_dir.glob("*.png"))
    if not ids:
        raise SubmissionError(f"{labels_dir}: no label PNGs (<id>.png) found")
    return ids


def score_submission(
    csv_path: str | os.PathLike, labels_dir: str | os.PathLike, num_classes: int, order: str = "C",
    class_map: ClassMap | None = None,
) -> dict:
    """Score a submission CSV against ``labels_dir/<id>.png``.

    Args:
        csv_path: the submission.
        labels_dir: folder of 8-bit label PNGs; its ids are the ids the CSV must hold.
        num_classes: number of classes.
        order: RLE pixel order, ``"C"`` or ``"F"``.
        class_map: merges the label PNGs' classes into ``num_classes`` merged ones before scoring.

    Returns:
        dict with ``miou``, ``pixel_acc``, ``iou`` ((C,) float64, nan where the union is zero),
        ``confusion`` ((C, C + 1) int64, rows = target, last column = no class claimed),
        ``n_images`` and ``n_pixels`` (labelled pixels scored).

    Raises:
        SubmissionError: malformed CSV or labels (one-line message naming file, line, id and value).
    """
    csv_path, labels_dir = Path(csv_path), Path(labels_dir)
    ids = label_ids(labels_dir)
    groups = group_rows(read_submission(csv_path), ids, num_classes, str(csv_path))
    cm = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    lut = class_map.lut if class_map else None
    source_classes = len(class_map.source_classes) if class_map else num_classes
    for image_id in ids:
        label = read_label(labels_dir / f"{image_id}.png", source_classes)
        if lut is not None:
            label = lut[label]
        pred = decode_image(groups[image_id], label.shape, num_classes, order, str(csv_path), image_id)
        cm += confusion_matrix(label, pred, num_classes, none_column=True)
    return {
        "miou": mean_iou(cm),
        "pixel_acc": pixel_accuracy(cm),
        "iou": iou_per_class(cm),
        "confusion": cm,
        "n_images": len(ids),
        "n_pixels": int(cm.sum()),
    }


def read_classes(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt`` (one per line, blank lines ignored)."""
    try:
        names = tuple(line.strip() for line in read_text(path).splitlines() if line.strip())
    except OSError as e:
        raise SubmissionError(f"{path}: cannot read class list: {e.strerror}") from None
    if not names:
        raise SubmissionError(f"{path}: empty class list")
    return names


def _class_names(args: argparse.Namespace) -> tuple[str, ...]:
    if args.classes is not None:
        return read_classes(args.classes)
    if args.num_classes is not None:
        if args.num_classes == len(DEFAULT_CLASSES):
            return DEFAULT_CLASSES
        return tuple(f"class{i}" for i in range(args.num_classes))
    # A dataset root keeps classes.txt next to its label folders (<root>/test_labels).
    local = args.labels.parent / "classes.txt"
    return read_classes(local) if local.is_file() else DEFAULT_CLASSES


def format_scores(scores: dict, names: tuple[str, ...]) -> str:
    """Human-readable report: mIoU, pixel accuracy, one line per class."""
    lines = [
        f"mIoU            {scores['miou']:.4f}",
        f"pixel accuracy  {scores['pixel_acc']:.4f}",
        f"images          {scores['n_images']}  (labelled pixels {scores['n_pixels']})",
        "per-class IoU:",
    ]
    width = max(len(n) for n in names)
    for i, (name, iou) in enumerate(zip(names, scores["iou"])):
        value = "   n/a (absent)" if np.isnan(iou) else f"{iou:.4f}"
        lines.append(f"  {i:>3} {name:<{width}}  {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m submissions.score", description=__doc__.splitlines()[0])
    parser.add_argument("submission", type=Path, help="submission CSV")
    parser.add_argument("--labels", type=Path, required=True, help="folder of label PNGs <id>.png")
    parser.add_argument("--order", choices=("C", "F"), default="C", help="RLE pixel order (default C)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-classes", type=int, default=None, help="number of classes (default 13)")
    group.add_argument("--classes", type=Path, default=None, help="classes.txt, one name per line")
    parser.add_argument("--class-map", default=None,
                        help="merge the labels' classes first (a YAML new_name: [old names], or a shipped map name)")
    args = parser.parse_args(argv)

    def body() -> None:
        names = _class_names(args)
        if len(names) < 1:
            raise SubmissionError(f"--num-classes must be >= 1, got {args.num_classes}")
        class_map = read_class_map(args.class_map, names) if args.class_map else None
        if class_map:
            names = class_map.classes
        scores = score_submission(args.submission, args.labels, len(names), args.order, class_map)
        print(format_scores(scores, names))

    return run_entry_point(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
