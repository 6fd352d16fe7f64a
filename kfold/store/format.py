"""The OOF store's format: one fold's ``manifest.json`` as a dataclass, its constants, and its checks.

A fold store is ``oof.npy`` / ``oof_ids.txt``, ``test.npy`` / ``test_ids.txt`` and ``manifest.json``, written
last (see docs/ARCHITECTURE.md). Torch-free: the launcher, ``kfold.status`` and the reuse check read it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldwise.io import read_json_object, read_text

MANIFEST = "manifest.json"
STORE_DTYPE = "float16"
# The experiment's test probabilities averaged over its folds, written once when the last fold completes.
# float32: a float16 mean would round near-ties and flip masks. Its record (written last) names the fold stores
# it averages, so a fold predicted again invalidates it.
TEST_MEAN = "test_mean.npy"
TEST_MEAN_RECORD = "test_mean.json"
FOLD_DIR = re.compile(r"fold(\d+)")
PROB_TOL = 1e-3  # float16 rounding and bilinear resizing keep values in [0, 1] up to this
SUM_TOL = 1e-2  # ... and class sums at 1 up to this
# Keys every fold of one experiment must agree on.
SAME_ACROSS_FOLDS = ("folds_sha256", "classes", "oof_scale", "store_size", "image_size", "dtype", "k_folds",
                     "class_map")
_REQUIRED = ("fold", "classes", "store_size", "image_size", "oof", "test", "folds_sha256")


class StoreError(ValueError):
    """An experiment's OOF store is incomplete or inconsistent; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class StoreManifest:
    """A fold's ``manifest.json``. Stores written before a field existed load with its default.

    Args:
        experiment / fold / k_folds / n_train: which fold of which experiment; how many train ids in all.
        classes: class names (after the class map); ``class_map``: the map's record, or None.
        image_size / store_size: (H, W) of the labels and of the stored probabilities; ``oof_scale``.
        oof / test: ``{"file", "ids_file", "n", "shape"}`` of each array.
        tta: ``{"scales", "hflip", "temperature"}``; ``temperatures``: the per-temperature table's grid.
        folds_sha256 / data_root: the folds.csv digest and the root the fold was trained on.
        scores: what prediction measured (``oof_miou``, ``oof_pixel_acc``, ``oof_per_class_iou``,
            ``oof_depth``, ``temperature_cm_file``, ``created``) and any key this version does not know.
    """

    experiment: str
    fold: int
    k_folds: int | None
    n_train: int | None
    classes: list[str]
    image_size: list[int]
    store_size: list[int]
    oof_scale: float
    oof: dict[str, Any]
    test: dict[str, Any]
    tta: dict[str, Any]
    temperatures: list[float]
    folds_sha256: str
    data_root: str
    class_map: dict[str, Any] | None = None
    dtype: str = STORE_DTYPE
    status: str = "complete"
    scores: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "scores"}
        data["num_classes"] = self.num_classes
        return {**data, **self.scores}

    @classmethod
    def new(cls, *, experiment: str, fold: int, k_folds: int, n_train: int, classes: list[str],
            image_size: tuple[int, int], store_size: tuple[int, int], oof_scale: float, n_oof: int, n_test: int,
            tta: dict[str, Any], temperatures: list[float], folds_sha256: str, data_root: str | Path,
            class_map: dict[str, Any] | None = None, scores: dict[str, Any] | None = None) -> StoreManifest:
        """The manifest of a fold store with ``n_oof`` OOF and ``n_test`` test rows (the array records derived).

        Prediction writes it, and test and benchmark fixtures write fake stores with it, so neither can drift
        from the real format.
        """
        C = len(classes)
        return cls(experiment=experiment, fold=fold, k_folds=k_folds, n_train=n_train, classes=list(classes),
                   image_size=list(image_size), store_size=list(store_size), oof_scale=float(oof_scale),
                   oof=array_entry("oof", n_oof, C, store_size), test=array_entry("test", n_test, C, store_size),
                   tta=dict(tta), temperatures=list(temperatures), folds_sha256=folds_sha256,
                   data_root=str(Path(data_root).resolve()), class_map=class_map, scores=dict(scores or {}))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> StoreManifest:
        """Parse a manifest; ``where`` (``"<exp> fold <k>: <file>"``) starts every error message."""
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise StoreError(f"{where} has no key {missing[0]!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"scores"}
        known = {k: v for k, v in data.items() if k in names}
        scores = {k: v for k, v in data.items() if k not in names and k != "num_classes"}
        defaults = {"experiment": "", "k_folds": None, "n_train": None, "oof_scale": 0.0, "tta": {},
                    "temperatures": [], "data_root": ""}
        return cls(**{**defaults, **known}, scores=scores)


def array_entry(split: str, n: int, num_classes: int, size: tuple[int, int]) -> dict[str, Any]:
    """The manifest's record of ``<split>.npy``: file, ids file, row count and shape (n, C, h, w)."""
    return {"file": f"{split}.npy", "ids_file": f"{split}_ids.txt", "n": n, "shape": [n, num_classes, *size]}


def store_size(image_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(h, w) of the stored probabilities: ``round(scale x image size)``, at least 1."""
    if not scale > 0:
        raise ValueError(f"oof.scale must be > 0, got {scale!r}")
    return tuple(max(1, round(s * scale)) for s in image_size)  # type: ignore[return-value]


def is_complete(run_dir: str | Path) -> bool:
    """Whether the fold's ``manifest.json`` says complete (written last: every other file is whole)."""
    try:
        return json.loads((Path(run_dir) / MANIFEST).read_text()).get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        return False


def load_manifest(name: str, fold: int, path: Path) -> StoreManifest:
    """The complete manifest of ``path`` (a fold folder), or a StoreError naming experiment, fold and file."""
    file = path / MANIFEST
    if not file.is_file():
        raise StoreError(f"{name} fold {fold}: {file} missing (fold not complete)")
    try:
        data = read_json_object(file)
    except (OSError, ValueError) as err:
        raise StoreError(f"{name} fold {fold}: {str(err).replace(f'{file}: ', f'{file} unreadable: ', 1)}") from None
    if data.get("status") != "complete":
        raise StoreError(f"{name} fold {fold}: {file} status {data.get('status')!r} (fold not complete)")
    manifest = StoreManifest.from_dict(data, f"{name} fold {fold}: {file}")
    if manifest.fold != fold:
        raise StoreError(f"{name} fold {fold}: {file} says fold {manifest.fold!r}")
    return manifest


def fold_dirs(exp_dir: Path) -> dict[int, Path]:
    """``{fold: folder}`` of the ``fold<k>`` folders of an experiment folder."""
    if not exp_dir.is_dir():
        return {}
    found = {}
    for entry in exp_dir.iterdir():
        match = FOLD_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return dict(sorted(found.items()))


def list_experiments(runs_dir: str | Path) -> list[str]:
    """Sorted names of the experiments under ``runs_dir`` that have at least one ``fold<k>`` folder."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and fold_dirs(p))


def read_ids(path: Path) -> list[str]:
    """Ids of an ``*_ids.txt`` file, one per line (blank lines skipped)."""
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]
