"""A store's own confusion matrices at label resolution, kept beside it in ``runs/<exp>/store_scores.json``.

A store's score does not depend on what it is blended with, yet scoring each member at label resolution is a
large share of a blend's passes over the images (``bench/bench_blend_size.py`` runs a blend twice). The
experiment report keeps them when the last fold completes; a blend keeps what is missing; both reuse them
only while the stores (size and mtime of each fold's ``oof.npy``; the digests of the test stores), the data
root, its class map and the image size are the ones they were computed from.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from foldwise.io import read_text, write_json
from kfold.data.layout import DataRoot
from kfold.store.read import ExperimentStore, fold_test_digests

SCORES = "store_scores.json"
SPLITS = ("oof", "test")


def _identity(store: ExperimentStore, root: DataRoot, split: str) -> dict[str, Any]:
    if split == "oof":
        stats = [path.stat() for path in store.store_files("oof")]
        stores: list[dict[str, Any]] = [{"size": st.st_size, "mtime_ns": st.st_mtime_ns} for st in stats]
    else:
        stores = fold_test_digests(store.fold_arrays)
    return {"stores": stores, "data_root": str(root.path),
            "class_map": root.class_map.to_record() if root.class_map else None,
            "image_size": list(store.image_size)}


def _read(store: ExperimentStore) -> dict[str, Any]:
    try:
        record = json.loads(read_text(store.path / SCORES))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def cached_confusion(store: ExperimentStore, root: DataRoot, split: str) -> np.ndarray | None:
    """The store's (C, C) int64 confusion matrix of ``split`` ("oof" or "test"), or None when none was kept
    for these stores and labels."""
    entry = _read(store).get(split)
    try:
        if entry["identity"] != _identity(store, root, split):
            return None
        cm = np.asarray(entry["confusion"], dtype=np.int64)
    except (KeyError, TypeError, ValueError, OSError):
        return None
    return cm if cm.shape == (store.num_classes, store.num_classes) else None


def keep_confusion(store: ExperimentStore, root: DataRoot, split: str, cm: np.ndarray) -> None:
    """Record the store's confusion matrix of ``split`` (atomically; the other split's entry is kept)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    record = _read(store)
    record[split] = {"identity": _identity(store, root, split), "confusion": np.asarray(cm).tolist()}
    write_json(store.path / SCORES, record)
