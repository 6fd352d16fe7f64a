"""Scene-grouped, class-balanced k-fold splits of a dataset root, stored once as ``<root>/folds.csv``.

Every experiment on a root shares one ``folds.csv`` so their out-of-fold predictions can be blended.
Frames of one scene are near-duplicates, so a scene never straddles folds (groups = scenes); within
that constraint folds are stratified on a class-presence key so that rare classes land in every fold.

Usage:
    python -m kfold.splits --data-root DIR --k 5 --seed 42
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from foldwise.cli import ArgumentParser, at_least, run_entry_point
from foldwise.io import read_text, write_text
from kfold.data.layout import DataError, DataRoot, open_root, read_label

FOLDS_FILE = "folds.csv"
LOCK_FILE = ".folds.lock"
NO_CLASS = -1  # stratum of images with no (eligible) class present


def class_pixel_counts(root: DataRoot, ids: Sequence[str]) -> np.ndarray:
    """Class pixel counts of train labels: (len(ids), C) int64, rows in ``ids`` order.

    Counted over the root's own classes, never a class map's: ``folds.csv`` is shared by every experiment
    on the root, whatever classes it merges.
    """
    num_classes = len(root.source_classes)
    counts = np.zeros((len(ids), num_classes), dtype=np.int64)
    for row, image_id in enumerate(ids):
        label = read_label(root.label_path("train", image_id), num_classes)
        counts[row] = np.bincount(label.ravel(), minlength=256)[:num_classes]
    return counts


def presence_key(counts: np.ndarray, k: int) -> np.ndarray:
    """Stratification key per image: its rarest present class, with dataset-wide rarity ranking.

    A class whose stratum would hold fewer than ``k`` images cannot be spread over k folds, so it is
    dropped from the candidates (rarest first) and its images fall back to their next-rarest class.

    Args:
        counts: (N, C) class pixel counts per image.
        k: number of folds.
    """
    present = counts > 0
    # Rarest first; ties broken by class id so the ranking is deterministic.
    rarity = sorted(range(counts.shape[1]), key=lambda c: (counts[:, c].sum(), c))
    eligible = [c for c in rarity if present[:, c].any()]
    while True:
        key = np.full(len(counts), NO_CLASS, dtype=np.int64)
        for c in reversed(eligible):  # rarer classes overwrite commoner ones
            key[present[:, c]] = c
        small = [c for c in eligible if 0 < (key == c).sum() < k]
        if not small:
            break
        eligible.remove(small[0])
    n_none = int((key == NO_CLASS).sum())
    if 0 < n_none < k and eligible:
        # Too few images without any eligible class: pool them with the commonest stratum.
        values, sizes = np.unique(key[key != NO_CLASS], return_counts=True)
        key[key == NO_CLASS] = values[np.argmax(sizes)]
    return key


def make_folds(root: DataRoot, k: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign every train image to one of ``k`` folds (scene-grouped, class-stratified).

    Args:
        root: the dataset root.
        k: number of folds (>= 2).
        seed: shuffling seed of ``StratifiedGroupKFold``.

    Returns:
        DataFrame with columns ``id`` and ``fold``, sorted by id.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    # Here, not at the top: folds are made once per root, and every training process imports this module.
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    ids = sorted(root.train_ids)
    groups = np.asarray([root.scenes.get(i, i) for i in ids])
    n_groups = len(set(groups.tolist()))
    if n_groups < k:
        raise DataError(f"{root.path}: {n_groups} scenes among {len(ids)} train images; "
                        f"cannot make {k} scene-disjoint folds")
    key = presence_key(class_pixel_counts(root, ids), k)
    x = np.zeros((len(ids), 1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            test_sets = [test for _, test in splitter.split(x, key, groups)]
    except ValueError:
        # Stratification impossible (e.g. one class stratum only): keep the scene grouping alone.
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
        test_sets = [test for _, test in splitter.split(x, key, groups)]
    fold = np.full(len(ids), -1, dtype=np.int64)
    for f, test in enumerate(test_sets):
        fold[test] = f
    if (fold < 0).any() or len(set(fold.tolist())) != k:
        raise DataError(f"{root.path}: could not fill {k} folds from {n_groups} scenes")
    return pd.DataFrame({"id": ids, "fold": fold})


def _folds_text(folds: pd.DataFrame) -> str:
    return "id,fold\n" + "".join(f"{i},{int(f)}\n" for i, f in zip(folds["id"], folds["fold"]))


def read_folds(root: DataRoot) -> dict[str, int]:
    """Read and validate ``<root>/folds.csv``: every train id exactly once, folds 0..k-1 all present.

    Args:
        root: the dataset root.

    Returns:
        Mapping train id -> fold.
    """
    path = Path(root.path) / FOLDS_FILE
    if not path.is_file():
        raise DataError(f"{path}: file not found (run python -m kfold.splits --data-root {root.path})")
    rows = list(csv.reader(io.StringIO(read_text(path))))
    if not rows or [c.strip() for c in rows[0]] != ["id", "fold"]:
        raise DataError(f"{path}: header must be 'id,fold'")
    folds: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise DataError(f"{path}: line {lineno} must have 2 fields, got {len(row)}")
        image_id, value = row[0].strip(), row[1].strip()
        try:
            fold = int(value)
        except ValueError:
            raise DataError(f"{path}: line {lineno}: fold {value!r} is not an integer") from None
        if fold < 0:
            raise DataError(f"{path}: line {lineno}: fold {fold} is negative")
        if image_id in folds:
            raise DataError(f"{path}: line {lineno}: duplicate id {image_id!r}")
        folds[image_id] = fold
    train = set(root.train_ids)
    unknown = sorted(set(folds) - train)
    if unknown:
        raise DataError(f"{path}: {len(unknown)} ids are not train images, e.g. {unknown[0]!r}")
    missing = sorted(train - set(folds))
    if missing:
        raise DataError(f"{path}: {len(missing)} train images have no fold, e.g. {missing[0]!r}")
    k = max(folds.values()) + 1
    absent = sorted(set(range(k)) - set(folds.values()))
    if absent:
        raise DataError(f"{path}: fold {absent[0]} of 0..{k - 1} has no image")
    return folds


def ensure_folds(root: DataRoot, k: int = 5, seed: int = 42) -> Path:
    """Write ``<root>/folds.csv`` when missing, else validate the existing one (it wins over ``seed``).

    Safe when several processes (e.g. folds started in parallel) call it at once: an exclusive lock on
    ``<root>/.folds.lock`` serialises them and the file is written atomically.

    Args:
        root: the dataset root.
        k: number of folds; an existing file with another k is an error.
        seed: shuffling seed used when the file is created.
    """
    path = Path(root.path) / FOLDS_FILE
    try:
        lock = open(Path(root.path) / LOCK_FILE, "a")  # noqa: SIM115 (closed by the with below)
    except OSError:
        # A read-only root whose folds exist needs no lock: nobody can write there.
        if not path.exists():
            raise DataError(f"{path}: missing and {root.path} is not writable") from None
        folds = read_folds(root)
    else:
        with lock:  # closing the file releases the flock
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                write_text(path, _folds_text(make_folds(root, k=k, seed=seed)))
            folds = read_folds(root)
    found = max(folds.values()) + 1
    if found != k:
        raise DataError(f"{path}: holds {found} folds but k={k} was asked; delete it to re-split")
    return path


def folds_sha256(root: DataRoot) -> str:
    """SHA-256 hex digest of the bytes of ``<root>/folds.csv`` (recorded in every run's config)."""
    return hashlib.sha256((Path(root.path) / FOLDS_FILE).read_bytes()).hexdigest()


def fold_summary(root: DataRoot, folds: dict[str, int]) -> pd.DataFrame:
    """Per-fold image and scene counts and class pixel shares (in % of the fold's labelled pixels)."""
    counts = class_pixel_counts(root, root.train_ids)
    fold_of = np.asarray([folds[i] for i in root.train_ids])
    rows = []
    for f in range(max(folds.values()) + 1):
        sel = fold_of == f
        pixels = counts[sel].sum(axis=0)
        shares = 100.0 * pixels / max(int(pixels.sum()), 1)
        scenes = {root.scenes.get(i, i) for i, s in zip(root.train_ids, sel) if s}
        rows.append({"fold": f, "images": int(sel.sum()), "scenes": len(scenes),
                     **{name: round(float(v), 2) for name, v in zip(root.source_classes, shares)}})
    return pd.DataFrame(rows).set_index("fold")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write (or check) folds.csv and print per-fold counts and class pixel shares."""
    parser = ArgumentParser(prog="python -m kfold.splits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=at_least(0), default=42)
    args = parser.parse_args(argv)

    def body() -> None:
        if args.k < 2:
            raise ValueError(f"--k {args.k}: k-fold needs at least 2 folds")
        root = open_root(args.data_root)
        path = ensure_folds(root, k=args.k, seed=args.seed)
        summary = fold_summary(root, read_folds(root))
        with pd.option_context("display.width", 200, "display.max_columns", 50):
            print(summary.to_string())
        print(f"{path}  sha256 {folds_sha256(root)}")

    return run_entry_point(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
