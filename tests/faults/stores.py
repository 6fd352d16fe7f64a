"""Complete experiment stores written in the kfold.store manifest format, from the root's own labels: the one
fake-store builder of the suite.

Cheap stand-ins for trained folds: probabilities at half resolution made from each image's labels (by default
softened one-hot), so the blend and the store checks have real, valid data to work on and the tests can then
break one thing at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from foldwise.io import save_npy, write_json, write_text
from kfold.data.layout import open_root, read_label
from kfold.splits import folds_sha256, read_folds
from kfold.store.format import StoreManifest

Probs = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]  # (labels, num_classes, rng) -> probs


def peaked_probs(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(n, C, h, w) float16 probabilities peaked (0.6) on the label; ignore pixels get a random class."""
    lab = np.where(labels == 255, rng.integers(0, num_classes, labels.shape), np.minimum(labels, num_classes - 1))
    onehot = np.moveaxis(np.eye(num_classes)[lab], -1, 1)
    p = onehot * 0.6 + (1 - onehot) * 0.4 / (num_classes - 1)
    p = p * np.exp(0.2 * rng.standard_normal(p.shape))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float16)


def write_store(runs: Path, name: str, root_path: Path, seed: int = 0, classes: list[str] | None = None,
                probs: Probs = peaked_probs, folds_sha256_override: str | None = None) -> Path:
    """Write every fold of experiment ``name`` under ``runs`` and return ``runs/name``.

    Args:
        runs: the runs folder.
        name: experiment name.
        root_path: a dataset root with ``folds.csv``.
        seed: noise seed of the probabilities.
        classes: class names to record (default the root's); the arrays get ``len(classes)`` channels.
        probs: makes a split's (n, C, h, w) float16 probabilities from its half-resolution labels (OOF first,
            then test, from one generator per fold seeded by (seed, fold)).
        folds_sha256_override: the folds.csv digest to record instead of the root's (a store of other folds).
    """
    root = open_root(root_path, verify=False)
    classes = list(classes or root.classes)
    C = len(classes)
    folds, sha = read_folds(root), folds_sha256_override or folds_sha256(root)
    k = max(folds.values()) + 1
    (H, W), (h, w) = root.image_size, (root.image_size[0] // 2, root.image_size[1] // 2)
    rows, cols = np.arange(h) * 2 + 1, np.arange(w) * 2 + 1

    def small(split: str, ids: list[str]) -> np.ndarray:
        if split == "test" and not root.has_test_labels:
            return np.zeros((len(ids), h, w), dtype=np.uint8)
        return np.stack([read_label(root.label_path(split, i), root.num_classes)[rows[:, None], cols[None, :]]
                         for i in ids])

    for f in range(k):
        rng = np.random.default_rng([seed, f])
        d = runs / name / f"fold{f}"
        val = sorted(i for i, g in folds.items() if g == f)
        oof = probs(small("train", val), C, rng)
        test = probs(small("test", list(root.test_ids)), C, rng)
        save_npy(d / "oof.npy", oof)
        save_npy(d / "test.npy", test)
        write_text(d / "oof_ids.txt", "".join(f"{i}\n" for i in val))
        write_text(d / "test_ids.txt", "".join(f"{i}\n" for i in root.test_ids))
        write_json(d / "manifest.json", StoreManifest.new(
            experiment=name, fold=f, k_folds=k, n_train=len(folds), classes=classes, image_size=(H, W),
            store_size=(h, w), oof_scale=0.5, n_oof=len(val), n_test=len(test),
            tta={"scales": [1.0], "hflip": False, "temperature": 1.0}, temperatures=[1.0], folds_sha256=sha,
            data_root=root.path).to_dict())
    return runs / name
