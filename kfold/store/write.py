"""Writing one fold's store: TTA-merged OOF and test probabilities, the temperature table, the manifest.

Arrays are streamed row by row into ``np.lib.format.open_memmap`` files under temporary names and renamed
when whole; ``manifest.json`` is removed first and written last, so a fold counts as done only when every
file it names is complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from foldwise.io import atomic_path, save_npy, sha256_file, write_json, write_text
from kfold.config import Recipe
from kfold.data.dataset import SegmentationDataset
from kfold.data.layout import DataRoot
from kfold.data.transforms import EvalTransform
from kfold.metrics import DepthMeter, confusion_matrix_torch, iou_per_class, mean_iou, pixel_accuracy
from kfold.splits import folds_sha256 as root_folds_sha256
from kfold.splits import read_folds
from kfold.store.format import (
    MANIFEST,
    STORE_DTYPE,
    TEST_MEAN,
    TEST_MEAN_RECORD,
    StoreManifest,
    store_size,
)
from kfold.store.read import ExperimentStore, fold_test_digests, full_res_argmax
from tta import TTAConfig, TTAOutput, predict_tta

Batch = dict[str, Any]


def tta_config(recipe: Recipe) -> TTAConfig:
    """The recipe's TTA with every temperature needed: the grid plus the stored one."""
    t = recipe.tta
    temperatures = tuple(sorted({*t.temperatures, t.temperature}))
    return TTAConfig(scales=t.scales, hflip=t.hflip, stride=t.stride, max_batch=t.max_batch,
                     temperatures=temperatures)


@contextlib.contextmanager
def open_npy(path: Path, shape: tuple[int, ...], dtype: str = STORE_DTYPE) -> Iterator[np.ndarray]:
    """A writable ``.npy`` memmap under a temporary name, flushed and renamed onto ``path`` on success."""
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array


def predict_rows(model: Callable[[torch.Tensor], object], images: torch.Tensor, cfg: TTAConfig,
                 size: tuple[int, int], temperature: float) -> tuple[torch.Tensor, TTAOutput]:
    """A batch as a fold store keeps it: TTA-merged at the store size, at the stored temperature, float16.

    ``ensemble.predict`` calls it too, so masks of new images are made as the submission's were.

    Returns:
        (the float16 rows (n, C, h, w), the merged TTA output with every temperature and depth).
    """
    merged = predict_tta(model, images, cfg, out_size=size)
    return merged.probs[temperature].half(), merged


def autocast_forward(model: nn.Module, device: torch.device, amp: torch.dtype | None) -> Callable:
    """``model`` under the autocast dtype its fold was predicted with (None: float32)."""

    def forward(x: torch.Tensor) -> object:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return model(x)

    return forward


def _predict_into(model: Callable[[torch.Tensor], object], loader: DataLoader, cfg: TTAConfig,
                  size: tuple[int, int], temperature: float, out: np.ndarray, device: torch.device, desc: str,
                  on_batch: Callable[[Batch, TTAOutput], None] | None = None) -> list[str]:
    """Predict every batch of ``loader`` into the rows of ``out`` (stored temperature); return the ids."""
    ids: list[str] = []
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty())
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        stored, merged = predict_rows(model, images, cfg, size, temperature)
        finite = torch.isfinite(stored).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = batch["id"][int((~finite).nonzero()[0])]
            raise ValueError(f"{desc}: the model predicts non-finite probabilities for id {bad!r}")
        out[len(ids) : len(ids) + len(stored)] = stored.cpu().numpy()
        ids.extend(batch["id"])
        bar.set_postfix(img_s=f"{len(ids) / (time.perf_counter() - start):.1f}", tta=f"{cfg.num_views}x")
        if on_batch is not None:
            on_batch(batch, merged)
    if len(ids) != len(out):
        raise ValueError(f"{desc}: the loader gave {len(ids)} images for {len(out)} rows")
    return ids


def _json_float(value: float) -> float | None:
    # A class absent from a fold has IoU nan, which strict JSON cannot hold.
    return None if math.isnan(value) else float(value)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class OofScorer:
    """Confusion matrices per temperature and depth metrics of the OOF batches, as they are predicted."""

    def __init__(self, temperatures: Sequence[float], num_classes: int, image_size: tuple[int, int],
                 device: torch.device) -> None:
        self.cms = {t: torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
                    for t in temperatures}
        self.num_classes, self.image_size, self.device = num_classes, image_size, device
        self.depth_meter = DepthMeter(device)
        self.has_depth = False

    def __call__(self, batch: Batch, merged: TTAOutput) -> None:
        labels = batch["label"].to(self.device)
        for t in self.cms:
            # Scored from the float16 values the store keeps, so the table matches a rescoring of the store.
            pred = full_res_argmax(merged.probs[t].half(), self.image_size)
            self.cms[t] += confusion_matrix_torch(labels, pred, self.num_classes)
        if merged.depth is not None:
            self.has_depth = True
            self.depth_meter.update(merged.depth, batch["depth"].to(self.device))

    def write_table(self, run_dir: Path) -> list[dict[str, float]]:
        """``oof_temperature.csv`` and its confusion matrices; returns the table's rows."""
        temperatures = list(self.cms)
        cm_stack = torch.stack([self.cms[t] for t in temperatures]).cpu().numpy()
        table = [{"temperature": t, "miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm)}
                 for t, cm in zip(temperatures, cm_stack)]
        write_text(run_dir / "oof_temperature.csv", _csv_text(table))
        save_npy(run_dir / "oof_temperature_cm.npy", cm_stack)
        return table

    def metrics(self, temperature: float, classes: Sequence[str], table: list[dict[str, float]]) -> dict[str, Any]:
        cm = self.cms[temperature].cpu().numpy()
        return {
            "oof_miou": mean_iou(cm),
            "oof_pixel_acc": pixel_accuracy(cm),
            "oof_per_class_iou": {c: float(v) for c, v in zip(classes, iou_per_class(cm))},
            "oof_temperature": {row["temperature"]: row["miou"] for row in table},
            "oof_depth": self.depth_meter.compute() if self.has_depth else None,
        }


def _check_fold(root: DataRoot, fold: int, val_ids: Sequence[str], folds_sha256: str) -> dict[str, int]:
    """The root's folds, checked: the same folds.csv the fold was trained on, and ``val_ids`` its fold."""
    current = root_folds_sha256(root)
    if current != folds_sha256:
        raise ValueError(f"{root.path / 'folds.csv'}: sha256 {current[:12]}... differs from the run's "
                         f"{folds_sha256[:12]}... (the folds changed since training)")
    folds = read_folds(root)
    expected = sorted(i for i, f in folds.items() if f == fold)
    if sorted(val_ids) != expected:
        raise ValueError(f"{root.path / 'folds.csv'}: val_ids ({len(val_ids)}) are not fold {fold}'s "
                         f"{len(expected)} ids")
    return folds


def _loader(root: DataRoot, recipe: Recipe, split: str, ids: Sequence[str], device: torch.device) -> DataLoader:
    dataset = SegmentationDataset(root, split, ids, EvalTransform(recipe.data.input_size), recipe.data.in_channels,
                                  with_labels=split == "train" or root.has_test_labels)
    return DataLoader(dataset, batch_size=recipe.oof.batch_size, shuffle=False,
                      num_workers=recipe.data.num_workers, pin_memory=device.type == "cuda")


def fold_manifest(recipe: Recipe, root: DataRoot, experiment: str, fold: int, folds: dict[str, int],
                  n_oof: int, folds_sha256: str, metrics: dict[str, Any]) -> StoreManifest:
    """The manifest of a fold store just written."""
    cfg = tta_config(recipe)
    size = store_size(tuple(root.image_size), recipe.oof.scale)
    return StoreManifest.new(
        experiment=experiment, fold=fold, k_folds=max(folds.values()) + 1, n_train=len(folds), classes=root.classes,
        image_size=root.image_size, store_size=size, oof_scale=recipe.oof.scale, n_oof=n_oof,
        n_test=len(root.test_ids),
        tta={"scales": list(cfg.scales), "hflip": cfg.hflip, "temperature": float(recipe.tta.temperature)},
        temperatures=list(cfg.temperatures), folds_sha256=folds_sha256, data_root=root.path,
        class_map=root.class_map.to_record() if root.class_map else None,
        scores={"temperature_cm_file": "oof_temperature_cm.npy",
                "oof_miou": _json_float(metrics["oof_miou"]),
                "oof_pixel_acc": _json_float(metrics["oof_pixel_acc"]),
                "oof_per_class_iou": {c: _json_float(v) for c, v in metrics["oof_per_class_iou"].items()},
                "oof_depth": metrics["oof_depth"],
                "created": datetime.now(UTC).isoformat(timespec="seconds")})


def predict_fold(model: nn.Module, recipe: Recipe, root: DataRoot, fold: int, val_ids: Sequence[str],
                 run_dir: Path, device: torch.device, folds_sha256: str, experiment: str,
                 amp: torch.dtype | None = None, teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the fold's OOF and test probabilities, temperature table and manifest into ``run_dir``.

    Args:
        model: the fold's model (logits or ``(logits, depth)``), already on ``device``.
        recipe: the resolved recipe (``tta``, ``oof``, ``data.input_size``, ``data.in_channels``).
        root: the dataset root.
        fold: fold index; ``val_ids`` must be exactly this fold's ids in ``<root>/folds.csv``.
        val_ids: the fold's validation ids (row order of ``oof.npy``).
        run_dir: ``runs/<experiment>/fold<k>``.
        device: where to run the model.
        folds_sha256: digest of the folds.csv the fold was trained on; must match the root's.
        experiment: the experiment name.
        amp: autocast dtype of the model's forward passes (None: float32).
        teacher: a distilled fold's teacher citation (``kfold.store.teacher.cite``), kept in the manifest.

    Returns:
        ``oof_miou``, ``oof_pixel_acc``, ``oof_per_class_iou``, ``oof_temperature`` ({T: mIoU}) and
        ``oof_depth`` (RMSE, AbsRel, delta1; None without a depth head).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A crash below must never leave an old "complete" manifest next to half-rewritten files.
    (run_dir / MANIFEST).unlink(missing_ok=True)
    folds = _check_fold(root, fold, val_ids, folds_sha256)
    cfg, T, C = tta_config(recipe), float(recipe.tta.temperature), root.num_classes
    size = store_size(tuple(root.image_size), recipe.oof.scale)
    scorer = OofScorer(cfg.temperatures, C, tuple(root.image_size), device)
    forward = autocast_forward(model, device, amp)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            test_scorer = OofScorer([T], C, tuple(root.image_size), device) if root.has_test_labels else None
            for split, ids, on_batch in (("oof", val_ids, scorer), ("test", root.test_ids, test_scorer)):
                with open_npy(run_dir / f"{split}.npy", (len(ids), C, *size)) as out:
                    written = _predict_into(forward, _loader(root, recipe, "train" if split == "oof" else "test",
                                                             ids, device),
                                            cfg, size, T, out, device, f"{experiment} fold {fold} {split}", on_batch)
                write_text(run_dir / f"{split}_ids.txt", "".join(f"{i}\n" for i in written))
    finally:
        model.train(was_training)
    metrics = scorer.metrics(T, root.classes, scorer.write_table(run_dir))
    test = test_scorer.metrics(T, root.classes, []) if test_scorer else None
    write_final_metrics(run_dir, metrics, test, root.classes)
    manifest = fold_manifest(recipe, root, experiment, fold, folds, len(val_ids), folds_sha256, metrics)
    manifest.scores["test_sha256"] = sha256_file(run_dir / "test.npy")  # names this store in the fold mean
    if teacher is not None:
        manifest.scores["teacher"] = teacher
    write_json(run_dir / MANIFEST, manifest.to_dict())
    return {**metrics, "test": test}


def final_table(rows: dict[str, dict[str, float | None]]) -> str:
    """``{column: {metric: value}}`` as ``metric,column,...`` CSV text."""
    columns = list(rows)
    metrics = list(next(iter(rows.values())))
    lines = [",".join(["metric", *columns])]
    for metric in metrics:
        cells = ["" if rows[c][metric] is None or math.isnan(rows[c][metric]) else f"{rows[c][metric]:.6f}"
                 for c in columns]
        lines.append(",".join([metric, *cells]))
    return "\n".join(lines) + "\n"


def format_final_table(csv_text: str) -> str:
    """``final_metrics.csv`` as aligned columns for the log."""
    rows = [line.split(",") for line in csv_text.strip().splitlines()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + f"{r[0]:<{widths[0]}}" + "".join(f"  {c:>{w}}" for c, w in zip(r[1:], widths[1:]))
                     for r in rows)


def write_final_metrics(run_dir: Path, validation: dict[str, Any], test: dict[str, Any] | None,
                        classes: Sequence[str]) -> None:
    """``final_metrics.csv``: pixel accuracy, mIoU and per-class IoU of this fold's model on its validation
    images (OOF, with TTA) and, when the root has test labels, on the test images."""

    def column(m: dict[str, Any]) -> dict[str, float | None]:
        return {"pixel_acc": m["oof_pixel_acc"], "miou": m["oof_miou"],
                **{f"iou_{c}": m["oof_per_class_iou"][c] for c in classes}}

    rows = {"validation": column(validation)}
    if test is not None:
        rows["test"] = column(test)
    write_text(run_dir / "final_metrics.csv", final_table(rows))


def write_test_mean(store: ExperimentStore, keep_fold_test: bool = True) -> Path:
    """Write ``test_mean.npy`` (float32 fold mean of the test stores, chunk by chunk) and its record, last.

    Args:
        store: a complete experiment (its folds' test stores present).
        keep_fold_test: keep the folds' ``test.npy``; False deletes them once the mean is whole (their
            manifests keep the sha256 the record names).

    Returns:
        The path of the mean.
    """
    path = store.path / TEST_MEAN
    (store.path / TEST_MEAN_RECORD).unlink(missing_ok=True)  # never a record beside a mean being rewritten
    shape = (len(store.test_ids), store.num_classes, *store.store_size)
    with open_npy(path, shape, dtype="float32") as out:
        start = 0
        for ids, probs in store.iter_test(check=True, from_folds=True):
            out[start : start + len(ids)] = probs
            start += len(ids)
    record = {"folds": fold_test_digests(store.fold_arrays), "shape": list(shape), "dtype": "float32",
              "test_ids": list(store.test_ids), "created": datetime.now(UTC).isoformat(timespec="seconds")}
    write_json(store.path / TEST_MEAN_RECORD, record)
    if not keep_fold_test:
        for fa in store.fold_arrays:
            if fa.manifest.scores.get("test_sha256"):  # older stores without a digest keep their test.npy
                (fa.path / fa.manifest.test["file"]).unlink(missing_ok=True)
    return path
