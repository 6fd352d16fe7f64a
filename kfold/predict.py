"""Prediction of one fold: TTA-merged OOF and test probabilities, the temperature table, the manifest.

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

from foldwise.io import atomic_path, save_npy, write_json, write_text
from kfold.config import Recipe
from kfold.data.dataset import SegmentationDataset
from kfold.data.layout import DataRoot
from kfold.data.transforms import EvalTransform
from kfold.metrics import DepthMeter, confusion_matrix_torch, iou_per_class, mean_iou, pixel_accuracy
from kfold.oof import MANIFEST, STORE_DTYPE, full_res_argmax
from kfold.splits import folds_sha256 as root_folds_sha256
from kfold.splits import read_folds
from tta import TTAConfig, TTAOutput, predict_tta

Batch = dict[str, Any]


def store_size(image_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(h, w) of the stored probabilities: ``round(scale x image size)``, at least 1."""
    if not scale > 0:
        raise ValueError(f"oof.scale must be > 0, got {scale!r}")
    return tuple(max(1, round(s * scale)) for s in image_size)  # type: ignore[return-value]


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


def _predict_into(
    model: Callable[[torch.Tensor], object],
    loader: DataLoader,
    cfg: TTAConfig,
    size: tuple[int, int],
    temperature: float,
    out: np.ndarray,
    device: torch.device,
    desc: str,
    on_batch: Callable[[Batch, TTAOutput], None] | None = None,
) -> list[str]:
    """Predict every batch of ``loader`` into the rows of ``out`` (stored temperature); return the ids."""
    ids: list[str] = []
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty())
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        merged = predict_tta(model, images, cfg, out_size=size)
        stored = merged.probs[temperature].half()
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


def store_manifest(experiment: str, fold: int, k_folds: int, n_train: int, classes: Sequence[str],
                   image_size: Sequence[int], store_size: Sequence[int], oof_scale: float, n_oof: int, n_test: int,
                   tta: dict[str, Any], temperatures: Sequence[float], folds_sha256: str,
                   data_root: str | Path, class_map: dict[str, Any] | None = None) -> dict[str, Any]:
    """The part of ``manifest.json`` that describes a fold's store (what ``kfold.oof`` checks).

    ``predict_fold`` adds the fold's scores to it; test and benchmark fixtures write fake stores with it, so
    they cannot drift from the real format.
    """
    C = len(classes)
    return {
        "status": "complete",
        "experiment": experiment,
        "fold": fold,
        "k_folds": k_folds,
        "n_train": n_train,
        "classes": list(classes),
        "num_classes": C,
        "image_size": list(image_size),
        "store_size": list(store_size),
        "oof_scale": float(oof_scale),
        "dtype": STORE_DTYPE,
        "oof": {"file": "oof.npy", "ids_file": "oof_ids.txt", "n": n_oof, "shape": [n_oof, C, *store_size]},
        "test": {"file": "test.npy", "ids_file": "test_ids.txt", "n": n_test, "shape": [n_test, C, *store_size]},
        "tta": dict(tta),
        "temperatures": list(temperatures),
        "folds_sha256": folds_sha256,
        "data_root": str(Path(data_root).resolve()),
        "class_map": class_map,  # the merge applied to the root's labels (ClassMap.to_record), or None
    }


def predict_fold(
    model: nn.Module,
    recipe: Recipe,
    root: DataRoot,
    fold: int,
    val_ids: Sequence[str],
    run_dir: Path,
    device: torch.device,
    folds_sha256: str,
    experiment: str,
    amp: torch.dtype | None = None,
) -> dict[str, Any]:
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

    Returns:
        ``oof_miou``, ``oof_pixel_acc``, ``oof_per_class_iou``, ``oof_temperature`` ({T: mIoU}) and
        ``oof_depth`` (RMSE, AbsRel, delta1; None without a depth head).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A crash below must never leave an old "complete" manifest next to half-rewritten files.
    (run_dir / MANIFEST).unlink(missing_ok=True)

    current = root_folds_sha256(root)
    if current != folds_sha256:
        raise ValueError(f"{root.path / 'folds.csv'}: sha256 {current[:12]}... differs from the run's "
                         f"{folds_sha256[:12]}... (the folds changed since training)")
    folds = read_folds(root)
    expected = sorted(i for i, f in folds.items() if f == fold)
    if sorted(val_ids) != expected:
        raise ValueError(f"{root.path / 'folds.csv'}: val_ids ({len(val_ids)}) are not fold {fold}'s "
                         f"{len(expected)} ids")

    cfg = tta_config(recipe)
    T = float(recipe.tta.temperature)
    C, image_size = root.num_classes, tuple(root.image_size)
    size = store_size(image_size, recipe.oof.scale)
    transform = EvalTransform(recipe.data.input_size)

    def loader(split: str, ids: Sequence[str]) -> DataLoader:
        dataset = SegmentationDataset(root, split, ids, transform, recipe.data.in_channels,
                                      with_labels=split == "train")
        return DataLoader(dataset, batch_size=recipe.oof.batch_size, shuffle=False,
                          num_workers=recipe.data.num_workers, pin_memory=device.type == "cuda")

    def forward(x: torch.Tensor) -> object:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return model(x)

    cms = {t: torch.zeros((C, C), dtype=torch.int64, device=device) for t in cfg.temperatures}
    depth_meter = DepthMeter(device)
    has_depth = False

    def score(batch: Batch, merged: TTAOutput) -> None:
        nonlocal has_depth
        labels = batch["label"].to(device)
        for t, probs in merged.probs.items():
            # Scored from the float16 values the store keeps, so the table matches a rescoring of the store.
            pred = full_res_argmax(probs.half(), image_size)
            cms[t] += confusion_matrix_torch(labels, pred, C)
        if merged.depth is not None:
            has_depth = True
            depth_meter.update(merged.depth, batch["depth"].to(device))

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            with open_npy(run_dir / "oof.npy", (len(val_ids), C, *size)) as oof:
                oof_ids = _predict_into(forward, loader("train", val_ids), cfg, size, T, oof, device,
                                        f"{experiment} fold {fold} oof", score)
            write_text(run_dir / "oof_ids.txt", "".join(f"{i}\n" for i in oof_ids))
            with open_npy(run_dir / "test.npy", (len(root.test_ids), C, *size)) as test:
                test_ids = _predict_into(forward, loader("test", root.test_ids), cfg, size, T, test, device,
                                         f"{experiment} fold {fold} test")
            write_text(run_dir / "test_ids.txt", "".join(f"{i}\n" for i in test_ids))
    finally:
        model.train(was_training)

    cm_stack = torch.stack([cms[t] for t in cfg.temperatures]).cpu().numpy()
    table = [{"temperature": t, "miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm)}
             for t, cm in zip(cfg.temperatures, cm_stack)]
    write_text(run_dir / "oof_temperature.csv", _csv_text(table))
    save_npy(run_dir / "oof_temperature_cm.npy", cm_stack)

    cm = cms[T].cpu().numpy()
    metrics: dict[str, Any] = {
        "oof_miou": mean_iou(cm),
        "oof_pixel_acc": pixel_accuracy(cm),
        "oof_per_class_iou": {c: float(v) for c, v in zip(root.classes, iou_per_class(cm))},
        "oof_temperature": {row["temperature"]: row["miou"] for row in table},
        "oof_depth": depth_meter.compute() if has_depth else None,
    }
    manifest = store_manifest(
        experiment, fold, max(folds.values()) + 1, len(folds), root.classes, image_size, size, recipe.oof.scale,
        len(oof_ids), len(test_ids), {"scales": list(cfg.scales), "hflip": cfg.hflip, "temperature": T},
        cfg.temperatures, folds_sha256, root.path, root.class_map.to_record() if root.class_map else None)
    manifest.update({
        "temperature_cm_file": "oof_temperature_cm.npy",
        "oof_miou": _json_float(metrics["oof_miou"]),
        "oof_pixel_acc": _json_float(metrics["oof_pixel_acc"]),
        "oof_per_class_iou": {c: _json_float(v) for c, v in metrics["oof_per_class_iou"].items()},
        "oof_depth": metrics["oof_depth"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    write_json(run_dir / MANIFEST, manifest)
    return metrics
