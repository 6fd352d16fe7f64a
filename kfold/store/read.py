"""Reading the OOF store of one experiment: its folds' ``oof.npy`` as one memory-mapped view in train-id order.

Every check runs before anything is scored (fold complete, each train id exactly once, one folds.csv,
matching classes / sizes / shapes), and every problem is a one-line :class:`StoreError` naming the
experiment, the fold and the file or id at fault. Arrays are read a chunk at a time, never whole.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from foldwise.classmap import ClassMap, class_map_from_record
from kfold.argmax import upsampled_argmax
from kfold.data.layout import DataError, DataRoot, open_root
from kfold.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from kfold.splits import FOLDS_FILE, folds_sha256, read_folds
from kfold.store.format import (
    MANIFEST,
    PROB_TOL,
    SAME_ACROSS_FOLDS,
    STORE_DTYPE,
    SUM_TOL,
    TEST_MEAN,
    TEST_MEAN_RECORD,
    StoreError,
    StoreManifest,
    fold_dirs,
    load_manifest,
    read_ids,
)
from tta import apply_temperature

_FAULTS = ("NaN or infinite", "negative", "> 1", "class sums away from 1")  # the order rows are judged in


@numba.njit(nogil=True, cache=True)
def _row_faults(probs: np.ndarray, prob_tol: float, sum_tol: float) -> np.ndarray:  # pragma: no cover - compiled
    """(n, 4) bool: which of ``_FAULTS`` each row of probs (n, C, P) float32 shows, in one pass over it (numpy
    would need four passes and their temporaries; ``bench/bench_blend_size.py`` reads stores this way).

    Per-pixel running sums, minima and maxima (element-wise, so LLVM vectorises them); a NaN or infinity
    anywhere in a pixel leaves its class sum non-finite."""
    n, num_classes, pixels = probs.shape
    faults = np.zeros((n, 4), np.bool_)
    sums, low, high = np.empty(pixels, np.float32), np.empty(pixels, np.float32), np.empty(pixels, np.float32)
    for i in range(n):
        sums[:], low[:], high[:] = probs[i, 0], probs[i, 0], probs[i, 0]
        for c in range(1, num_classes):
            for p in range(pixels):
                v = probs[i, c, p]
                sums[p] += v
                low[p] = v if v < low[p] else low[p]
                high[p] = v if v > high[p] else high[p]
        for p in range(pixels):
            faults[i, 0] |= not np.isfinite(sums[p])
            faults[i, 1] |= low[p] < -prob_tol
            faults[i, 2] |= high[p] > 1 + prob_tol
            faults[i, 3] |= abs(sums[p] - 1) > sum_tol
    return faults


def _as_float32(block: np.ndarray) -> np.ndarray:
    """float32 copy of a store block: torch widens float16 with vectorised code, numpy element by element."""
    if block.dtype == np.float16:  # (a copy first where the block is a read-only memory map: torch writes)
        return torch.from_numpy(block if block.flags.writeable else np.array(block)).float().numpy()
    return np.array(block, dtype=np.float32)


@dataclass
class FoldArrays:
    """One fold's memory-mapped arrays and row ids."""

    fold: int
    path: Path
    manifest: StoreManifest = field(repr=False)
    oof_ids: list[str] = field(repr=False)
    test_ids: list[str] = field(repr=False)
    oof: np.ndarray = field(repr=False)
    test: np.ndarray | None = field(repr=False)  # None once deleted in favour of the experiment's test_mean


@dataclass
class ExperimentStore:
    """A checked experiment store; see :func:`open_experiment`.

    Args:
        name: experiment name. classes / num_classes: the class set. folds: k.
        ids: sorted train ids. fold_of: train id -> fold. oof_index: train id -> (fold, row in oof.npy).
        image_size / store_size: (H, W) of the labels and of the stored probabilities.
        folds_sha256 / data_root: the folds.csv digest and the dataset root recorded by the folds.
        test_ids: test ids in the row order shared by every fold's test.npy.
    """

    name: str
    path: Path
    classes: tuple[str, ...]
    folds: int
    ids: tuple[str, ...] = field(repr=False)
    fold_of: dict[str, int] = field(repr=False)
    oof_index: dict[str, tuple[int, int]] = field(repr=False)
    image_size: tuple[int, int]
    store_size: tuple[int, int]
    oof_scale: float
    folds_sha256: str
    data_root: str
    test_ids: tuple[str, ...] = field(repr=False)
    fold_arrays: list[FoldArrays] = field(repr=False)
    class_map: ClassMap | None = field(default=None, repr=False)
    test_mean: np.ndarray | None = field(default=None, repr=False)  # float32 memmap of test_mean.npy, if valid

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def store_files(self, split: str) -> list[Path]:
        """The files a pass over ``split`` ("oof" or "test") reads: every fold's, or ``test_mean.npy`` alone."""
        if split == "test" and self.test_mean is not None:
            return [self.path / TEST_MEAN]
        return [a.path / getattr(a.manifest, split)["file"] for a in self.fold_arrays]

    def manifest(self, fold: int) -> StoreManifest:
        """The manifest of ``fold``."""
        return self.fold_arrays[fold].manifest

    def _check(self, probs: np.ndarray, fold: int | None, rows: Sequence[int], ids: Sequence[str], split: str
               ) -> None:
        """Raise a StoreError naming the fold and id of the first row with NaN / out-of-range values."""
        faults = _row_faults(np.ascontiguousarray(probs, dtype=np.float32).reshape(*probs.shape[:2], -1),
                             PROB_TOL, SUM_TOL)
        bad = {what: faults[:, k] for k, what in enumerate(_FAULTS)}
        flagged = [(int(np.flatnonzero(mask)[0]), what) for what, mask in bad.items() if mask.any()]
        if flagged:
            i, what = min(flagged, key=lambda x: x[0])  # first bad row; NaN before range before sums
            if fold is None:
                where, file = self.name, self.path / TEST_MEAN
            else:
                arrays = self.fold_arrays[fold]
                where, file = f"{self.name} fold {fold}", arrays.path / getattr(arrays.manifest, split)["file"]
            raise StoreError(f"{where}: {file} row {rows[i]} (id {ids[i]!r}): {what} probabilities")

    def iter_oof(
        self, chunk: int = 64, ids: Sequence[str] | None = None, check: bool = False
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield ``(ids, probs)`` with float32 probabilities (n, C, h, w), ``chunk`` images at a time.

        Args:
            chunk: images per step (peak memory ~ one chunk).
            ids: train ids to read, in this order (default: all, sorted).
            check: raise a StoreError on NaN, negative, > 1 values or class sums away from 1.
        """
        ids = list(self.ids if ids is None else ids)
        unknown = next((i for i in ids if i not in self.oof_index), None)
        if unknown is not None:
            raise StoreError(f"{self.name}: id {unknown!r} is not a train id of this store")
        C, (h, w) = self.num_classes, self.store_size
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            out = np.empty((len(part), C, h, w), dtype=np.float32)
            where = np.asarray([self.oof_index[i] for i in part], dtype=np.int64).reshape(-1, 2)
            for fold in np.unique(where[:, 0]):
                pos = np.flatnonzero(where[:, 0] == fold)
                pos = pos[np.argsort(where[pos, 1])]  # ascending rows: one forward sweep over the memmap
                rows = where[pos, 1]
                block = _as_float32(self.fold_arrays[fold].oof[rows])
                if check:
                    self._check(block, int(fold), rows.tolist(), [part[p] for p in pos], "oof")
                out[pos] = block
            yield part, out

    def iter_test(self, chunk: int = 64, check: bool = False, from_folds: bool = False, rows: range | None = None
                  ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield ``(ids, probs)``: float32 test probabilities averaged over the fold models, chunk by chunk.

        Read from ``test_mean.npy`` when the experiment has a valid one (the same float32 values), else
        averaged from the folds' stores.

        Args:
            chunk: images per step.
            check: validate every row read as in :meth:`iter_oof`.
            from_folds: average the folds' stores even when the mean exists (to write it).
            rows: the test rows to read (default: all), e.g. one worker's share.
        """
        rows = range(len(self.test_ids)) if rows is None else rows
        for start in range(rows.start, rows.stop, chunk):
            part = list(self.test_ids[start : min(start + chunk, rows.stop)])
            if self.test_mean is not None and not from_folds:  # one read instead of one per fold
                block = np.array(self.test_mean[start : start + len(part)])
                if check:
                    self._check(block, None, range(start, start + len(part)), part, "test")
                yield part, block
                continue
            blocks = []
            for arrays in self.fold_arrays:
                blocks.append(arrays.test[start : start + len(part)])
                if check:
                    self._check(_as_float32(blocks[-1]), arrays.fold,
                                range(start, start + len(part)), part, "test")
            yield part, mean_of_folds(blocks)

    def check_values(self, chunk: int = 64) -> None:
        """Read every OOF and test row once, chunk by chunk, and raise a StoreError on bad values."""
        for _ in self.iter_oof(chunk, check=True):
            pass
        for _ in self.iter_test(chunk, check=True):
            pass


def _load_split(name: str, fold: int, path: Path, manifest: StoreManifest, split: str
                ) -> tuple[np.ndarray | None, list[str]]:
    """Open ``<split>.npy`` read-only and check it against the manifest and its ids file."""
    info = getattr(manifest, split)
    where = f"{name} fold {fold}:"
    try:
        file, ids_file, shape = path / info["file"], path / info["ids_file"], tuple(info["shape"])
    except (KeyError, TypeError):
        raise StoreError(f"{where} {path / MANIFEST}: '{split}' needs file, ids_file and shape") from None
    if not ids_file.is_file():
        raise StoreError(f"{where} {ids_file} missing")
    if not file.is_file() and split == "test" and (path.parent / TEST_MEAN_RECORD).is_file():
        return None, read_ids(ids_file)  # deleted after the fold mean was written (oof.keep_fold_test false)
    if not file.is_file():
        raise StoreError(f"{where} {file} missing")
    try:
        array = np.load(file, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise StoreError(f"{where} {file} unreadable ({err})") from None
    if array.dtype != np.dtype(manifest.dtype) or array.dtype != np.dtype(STORE_DTYPE):
        raise StoreError(f"{where} {file} dtype {array.dtype}, manifest and store say {STORE_DTYPE}")
    expected = (manifest.num_classes, *manifest.store_size)
    if array.shape != shape or array.shape[1:] != expected:
        raise StoreError(f"{where} {file} shape {array.shape}, manifest says {shape} (N, {expected})")
    ids = read_ids(ids_file)
    if len(ids) != array.shape[0]:
        raise StoreError(f"{where} {ids_file} lists {len(ids)} ids for {array.shape[0]} rows of {file.name}")
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise StoreError(f"{where} {ids_file} lists id {image_id!r} twice")
        seen.add(image_id)
    return array, ids


def _root_folds(data_root: str, sha256: str) -> dict[str, int] | None:
    """The recorded folds.csv when the data root is still there with the same digest, else None."""
    if not data_root or not (Path(data_root) / FOLDS_FILE).is_file():
        return None
    try:
        root = open_root(data_root, verify=False)
        if folds_sha256(root) != sha256:
            return None
        return read_folds(root)
    except DataError:
        return None  # a moved or edited root: the store's own checks still hold


def mean_of_folds(fold_probs: Sequence[np.ndarray]) -> np.ndarray:
    """float32 mean of the fold models' (float16) probabilities, summed in fold order.

    The one way test probabilities are averaged over folds: the blend's submission and ``ensemble.predict``
    both use it, so they agree to the last bit.
    """
    acc = np.zeros(np.shape(fold_probs[0]), dtype=np.float32)
    for block in fold_probs:
        acc += np.asarray(block, dtype=np.float32)
    return acc / len(fold_probs)


def _recorded_k(found: dict[int, Path]) -> int | None:
    """k as the first readable manifest records it; else from the dataset root's folds.csv of the same digest."""
    first: dict[str, Any] = {}
    for path in found.values():
        with contextlib.suppress(OSError, ValueError):
            first = json.loads((path / MANIFEST).read_text())
            break
    if not isinstance(first, dict):
        return None
    if first.get("k_folds") is not None:
        return first["k_folds"]
    root_folds = _root_folds(str(first.get("data_root", "")), str(first.get("folds_sha256", "")))
    return max(root_folds.values()) + 1 if root_folds else None


def _open_folds(name: str, exp_dir: Path, k: int) -> list[FoldArrays]:
    """Each fold's manifest and memory-mapped arrays, checked against fold 0's."""
    arrays: list[FoldArrays] = []
    for fold in range(k):
        path = exp_dir / f"fold{fold}"
        manifest = load_manifest(name, fold, path)
        if arrays:
            ref = arrays[0].manifest
            for key in SAME_ACROSS_FOLDS:
                if getattr(manifest, key) != getattr(ref, key):
                    raise StoreError(f"{name} fold {fold}: {path / MANIFEST} {key} {getattr(manifest, key)!r} "
                                     f"differs from fold 0's {getattr(ref, key)!r}")
        oof, oof_ids = _load_split(name, fold, path, manifest, "oof")
        test, test_ids = _load_split(name, fold, path, manifest, "test")
        if arrays and test_ids != arrays[0].test_ids:
            at = next((i for i, (a, b) in enumerate(zip(test_ids, arrays[0].test_ids)) if a != b),
                      min(len(test_ids), len(arrays[0].test_ids)))
            raise StoreError(f"{name} fold {fold}: {path / manifest.test['ids_file']} differs from fold 0's "
                             f"test ids at row {at} ({len(test_ids)} vs {len(arrays[0].test_ids)} ids)")
        arrays.append(FoldArrays(fold, path, manifest, oof_ids, test_ids, oof, test))
    return arrays


def _index_oof(name: str, arrays: list[FoldArrays]) -> dict[str, tuple[int, int]]:
    """train id -> (fold, row); every id once, as many as the manifests record."""
    oof_index: dict[str, tuple[int, int]] = {}
    for fa in arrays:
        for row, image_id in enumerate(fa.oof_ids):
            if image_id in oof_index:
                raise StoreError(f"{name} fold {fa.fold}: id {image_id!r} in {fa.path / 'oof_ids.txt'} is also "
                                 f"in fold {oof_index[image_id][0]}")
            oof_index[image_id] = (fa.fold, row)
    n_train = arrays[0].manifest.n_train
    if n_train is not None and len(oof_index) != n_train:
        raise StoreError(f"{name}: the folds' oof_ids.txt cover {len(oof_index)} train ids, manifests record {n_train}")
    return oof_index


def _check_against_root_folds(name: str, exp_dir: Path, ref: StoreManifest,
                              oof_index: dict[str, tuple[int, int]]) -> None:
    """When the recorded root still has the same folds.csv, each id must sit in its fold there."""
    recorded_folds = _root_folds(ref.data_root, ref.folds_sha256)
    if recorded_folds is None:
        return
    folds_file = Path(ref.data_root) / FOLDS_FILE
    for image_id, fold in recorded_folds.items():
        if image_id not in oof_index:
            raise StoreError(f"{name} fold {fold}: train id {image_id!r} missing from "
                             f"{exp_dir / f'fold{fold}' / 'oof_ids.txt'}")
        if oof_index[image_id][0] != fold:
            raise StoreError(f"{name} fold {oof_index[image_id][0]}: id {image_id!r} belongs to fold {fold} "
                             f"in {folds_file}")
    extra_id = next((i for i in oof_index if i not in recorded_folds), None)
    if extra_id is not None:
        raise StoreError(f"{name} fold {oof_index[extra_id][0]}: id {extra_id!r} is not in {folds_file}")


def open_experiment(runs_dir: str | Path, name: str, k: int | None = None) -> ExperimentStore:
    """Open and check one experiment's OOF store (``runs_dir/name/fold<k>/``).

    Args:
        runs_dir: folder of the experiments (``runs/``).
        name: experiment name.
        k: expected number of folds; default: the ``k_folds`` the manifests record (else the folders).

    Returns:
        the checked :class:`ExperimentStore`; any problem is a one-line StoreError.
    """
    exp_dir = Path(runs_dir) / name
    found = fold_dirs(exp_dir)
    if not found:
        raise StoreError(f"{name}: no fold<k> folders in {exp_dir}")
    recorded = _recorded_k(found)
    if k is not None and recorded is not None and k != recorded:
        raise StoreError(f"{name}: expected {k} folds, manifests record k_folds={recorded}")
    k = k or recorded or max(found) + 1
    extra = [f for f in found if f >= k]
    if extra:
        raise StoreError(f"{name} fold {extra[0]}: {found[extra[0]]} is beyond k={k} folds")
    arrays = _open_folds(name, exp_dir, k)
    oof_index = _index_oof(name, arrays)
    ref = arrays[0].manifest
    _check_against_root_folds(name, exp_dir, ref, oof_index)
    ids = tuple(sorted(oof_index))
    return ExperimentStore(
        name=name, path=exp_dir, classes=tuple(ref.classes), folds=k, ids=ids,
        fold_of={i: oof_index[i][0] for i in ids}, oof_index={i: oof_index[i] for i in ids},
        image_size=tuple(ref.image_size), store_size=tuple(ref.store_size), oof_scale=float(ref.oof_scale),
        folds_sha256=ref.folds_sha256, data_root=ref.data_root, test_ids=tuple(arrays[0].test_ids),
        fold_arrays=arrays, class_map=_class_map(name, ref), test_mean=_open_test_mean(name, exp_dir, arrays))


def fold_test_digests(arrays: Sequence[FoldArrays]) -> list[dict[str, Any]]:
    """What identifies each fold's test store: the sha256 its manifest recorded, else (older stores) the file's
    size and modification time."""
    digests = []
    for fa in arrays:
        if fa.manifest.scores.get("test_sha256"):
            digests.append({"sha256": fa.manifest.scores["test_sha256"]})
        else:
            stat = (fa.path / fa.manifest.test["file"]).stat()
            digests.append({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return digests


def _open_test_mean(name: str, exp_dir: Path, arrays: list[FoldArrays]) -> np.ndarray | None:
    """The experiment's ``test_mean.npy`` when its record names exactly these fold stores, else None."""
    record_file = exp_dir / TEST_MEAN_RECORD
    deleted = [fa for fa in arrays if fa.test is None]
    mean = None
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            digests = ([{"sha256": fa.manifest.scores.get("test_sha256")} for fa in arrays] if deleted
                       else fold_test_digests(arrays))
            if record.get("folds") == digests:
                mean = np.load(exp_dir / TEST_MEAN, mmap_mode="r")
        except (OSError, ValueError):
            mean = None
    expected = (len(arrays[0].test_ids), arrays[0].manifest.num_classes, *arrays[0].manifest.store_size)
    if mean is not None and (mean.shape != expected or mean.dtype != np.float32):
        mean = None
    if mean is None and deleted:
        raise StoreError(f"{name} fold {deleted[0].fold}: {deleted[0].path / 'test.npy'} missing and "
                         f"{record_file} does not match the folds")
    return mean


def _class_map(name: str, manifest: StoreManifest) -> ClassMap | None:
    try:
        return class_map_from_record(manifest.class_map)
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{name} fold 0: {MANIFEST} class_map is not valid ({err})") from None


def full_res_argmax(probs: Tensor, size: tuple[int, int], temperature: float = 1.0, batch: int = 8) -> Tensor:
    """Class ids at full label resolution: bilinear upsampling of the probabilities, then argmax
    (``kfold.argmax.upsampled_argmax``: one fused pass, the same class maps in every process).

    Args:
        probs: (n, C, h, w) probabilities (any float dtype).
        size: (H, W) of the labels.
        temperature: re-temper the probabilities first (1.0: as they are).
        batch: images converted to float32 (and re-tempered) at once: bounds that temporary.

    Returns:
        uint8 (n, H, W) tensor on the input's device.
    """
    out = torch.empty((probs.shape[0], *size), dtype=torch.uint8, device=probs.device)
    for start in range(0, probs.shape[0], batch):
        p = probs[start : start + batch]
        if temperature != 1.0:
            p = apply_temperature(p, temperature)
        out[start : start + batch] = upsampled_argmax(p, size)
    return out


def resolve_root(root: DataRoot | str | Path | None, store: ExperimentStore) -> DataRoot:
    """The given root, or the one the store recorded (opened without re-verifying every file), with the
    store's class map applied to its labels."""
    if isinstance(root, DataRoot):
        return root
    return open_root(root if root is not None else store.data_root, verify=False, class_map=store.class_map)


def score_experiment(
    store: ExperimentStore, root: DataRoot | str | Path | None = None, chunk: int = 64, temperature: float = 1.0
) -> dict[str, Any]:
    """OOF mIoU of a store at full label resolution (one confusion matrix over every train image).

    Args:
        store: an opened experiment.
        root: the dataset root with the train labels (default: the root the folds recorded).
        chunk: images read and scored at a time (peak memory ~ one chunk).
        temperature: re-temper the stored probabilities before the argmax.

    Returns:
        ``miou``, ``pixel_acc``, ``per_class_iou`` ({class: IoU}), ``confusion_matrix`` (C, C) int64,
        ``fold_confusions`` (k, C, C) int64 (each fold's images alone), ``temperature`` and ``n_images``.
    """
    root = resolve_root(root, store)
    if tuple(root.classes) != tuple(store.classes):
        raise StoreError(f"{store.name}: classes {list(store.classes)} differ from {root.path}'s {list(root.classes)}")
    C = store.num_classes
    fold_cms = np.zeros((store.folds, C, C), dtype=np.int64)
    for ids, probs in store.iter_oof(chunk, check=True):
        labels = np.stack([root.label("train", i) for i in ids])
        if labels.shape[1:] != tuple(store.image_size):
            raise StoreError(f"{store.name}: {root.label_path('train', ids[0])} size {labels.shape[1:]} differs "
                             f"from the store's image size {tuple(store.image_size)}")
        pred = full_res_argmax(torch.from_numpy(probs), store.image_size, temperature).numpy()
        folds = np.asarray([store.fold_of[i] for i in ids])
        for f in np.unique(folds):
            fold_cms[f] += confusion_matrix(labels[folds == f], pred[folds == f], C)
    cm = fold_cms.sum(axis=0)
    iou = iou_per_class(cm)
    return {
        "miou": mean_iou(cm),
        "pixel_acc": pixel_accuracy(cm),
        "per_class_iou": {c: float(v) for c, v in zip(store.classes, iou)},
        "confusion_matrix": cm,
        "fold_confusions": fold_cms,
        "temperature": float(temperature),
        "n_images": len(store.ids),
    }
