"""What a distilled student kept of its teacher blend: the share of the blend's gain it recovered, overall and per
class, the test scores, and its inference time against the whole fold ensemble's, measured side by side.

recovered = (student - baseline) / (blend - baseline), on out-of-fold mIoU at full resolution: the student's and
the baseline's OOF scores fit nothing on the folds they score, and the blend's is its nested-CV estimate (each
fold's weights fitted without it). The baseline is the same student recipe trained without distillation on the
same folds (``<student>_baseline``). Written to ``runs/<student>/distill_report.json`` and the student's
leaderboard row's notes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble.bundle import BlendBundle, MemberBundle, open_from_runs
from ensemble.predict import load_models, predict_masks
from ensemble.record import read_blend_record
from foldwise.io import read_json_object, write_json
from foldwise.metrics import iou_per_class, mean_iou
from kfold.config import load_recipe
from kfold.data.layout import DataRoot, read_depth, read_rgb
from kfold.report import test_confusion
from kfold.store.read import ExperimentStore, open_experiment, score_experiment
from kfold.store.scores import cached_confusion

BASELINE_SUFFIX = "_baseline"
REPORT_FILE = "distill_report.json"
TIMED_IMAGES = 16  # test images each side predicts in the timing (after one warm-up batch)


def recovered(student: float, baseline: float, blend: float) -> float | None:
    """(student - baseline) / (blend - baseline); None where the blend does not beat the baseline (no gain to
    recover: a share of a loss would read as its opposite)."""
    gain = blend - baseline
    if not all(map(math.isfinite, (student, baseline, blend))) or gain <= 1e-9:
        return None
    return (student - baseline) / gain


def _scores(store: ExperimentStore, root: DataRoot) -> dict[str, Any]:
    oof = cached_confusion(store, root, "oof")
    oof = score_experiment(store, root)["confusion_matrix"] if oof is None else oof
    out = {"miou": mean_iou(oof), "per_class_iou": dict(zip(store.classes, iou_per_class(oof).tolist()))}
    if root.has_test_labels:
        test = cached_confusion(store, root, "test")
        out["test_miou"] = mean_iou(test_confusion(store, root) if test is None else test)
    return out


def student_bundle(runs_dir: Path, student: str) -> BlendBundle:
    """The student as one model (its fold-0 network, its own TTA): what distillation is for."""
    store = open_experiment(runs_dir, student)
    run = store.fold_arrays[0].path
    member = MemberBundle(student, load_recipe(run / "config.yaml"), (run / "model.safetensors",),
                          tuple(store.store_size))
    return BlendBundle(student, tuple(store.classes), tuple(store.image_size), np.ones(1), np.ones(1), (member,))


def seconds_per_image(bundles: Mapping[str, BlendBundle], root: DataRoot, device: str = "cpu") -> dict[str, float]:
    """Each bundle's predictor time per image (``ensemble.predict``: read to mask), on the same test images, in
    one run and in turn, after one warm-up batch each."""
    ids = list(root.test_ids or root.train_ids)[:TIMED_IMAGES]
    split = "test" if root.test_ids else "train"
    images = [read_rgb(root.image_path(split, i)) for i in ids]
    depths = [read_depth(root.depth_path(split, i)) if root.has_depth else None for i in ids]
    dev, out = torch.device(device), {}
    for name, bundle in bundles.items():
        loaded = load_models(bundle, dev)
        batch = max(m.recipe.oof.batch_size for m in bundle.members)
        with torch.inference_mode():
            predict_masks(loaded, bundle, images[:batch], depths[:batch], dev)
            start = time.perf_counter()
            for lo in range(0, len(ids), batch):
                predict_masks(loaded, bundle, images[lo : lo + batch], depths[lo : lo + batch], dev)
            out[name] = (time.perf_counter() - start) / len(ids)
    return out


def _passes(bundle: BlendBundle) -> str:
    """``2 members x 5 folds x 2 views = 20 forward passes`` (views: TTA scales x flips)."""
    views = [len(m.recipe.tta.scales) * (2 if m.recipe.tta.hflip else 1) for m in bundle.members]
    folds = [len(m.weights_files) for m in bundle.members]
    total = sum(f * v for f, v in zip(folds, views))
    parts = [f"{f} x {v}" for f, v in zip(folds, views)]
    shape = f"{len(parts)} x {parts[0]}" if len(set(parts)) == 1 else " + ".join(parts)
    return f"{shape} = {total} forward pass{'es' if total > 1 else ''}"


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.4f}"


def distill_report(runs_dir: Path, student: str, record_path: Path, root: DataRoot, device: str = "cpu"
                   ) -> dict[str, Any]:
    """Print and record the student's recovered share of its blend's gain, test scores and inference times."""
    runs_dir, record = Path(runs_dir), read_blend_record(record_path)
    baseline = f"{student}{BASELINE_SUFFIX}"
    scores = {name: _scores(open_experiment(runs_dir, name), root) for name in (student, baseline)}
    blend = {"miou": record.nested["miou"], "per_class_iou": record.nested["per_class_iou"],
             **({"test_miou": record.test["miou"]} if record.test else {})}
    s, b = scores[student], scores[baseline]
    per_class = {}
    for c in record.classes:
        blend_iou = blend["per_class_iou"].get(c)  # null in the record where the class never occurs
        per_class[c] = {"student": s["per_class_iou"][c], "baseline": b["per_class_iou"][c], "blend": blend_iou,
                        "recovered": recovered(s["per_class_iou"][c], b["per_class_iou"][c],
                                               float("nan") if blend_iou is None else blend_iou)}
    ensemble = open_from_runs(record_path, runs_dir)
    fast = student_bundle(runs_dir, student)
    timing = seconds_per_image({"ensemble": ensemble, "student": fast}, root, device)
    report = {
        "student": student, "baseline": baseline, "blend": record.name, "record": str(record_path),
        "oof_miou": {"student": s["miou"], "baseline": b["miou"], "blend_nested": blend["miou"]},
        "recovered": recovered(s["miou"], b["miou"], blend["miou"]), "per_class": per_class,
        "test_miou": {"student": s.get("test_miou"), "baseline": b.get("test_miou"), "blend": blend.get("test_miou")},
        "seconds_per_image": {**timing, "device": device, "images": min(TIMED_IMAGES, len(root.test_ids or
                                                                                          root.train_ids))},
        "speedup": timing["ensemble"] / timing["student"],
        "passes": {"ensemble": _passes(ensemble), "student": _passes(fast)},
        "created": datetime.now(UTC).isoformat(timespec="seconds")}
    write_json(runs_dir / student / REPORT_FILE, report)
    _note_in_row(runs_dir / student / "leaderboard_row.json", report)
    print(format_report(report))
    return report


def _note_in_row(path: Path, report: dict[str, Any]) -> None:
    if path.is_file():
        row = read_json_object(path)
        row["notes"] = (f"distilled from {report['blend']}: recovers {_fmt(report['recovered'], pct=True)} of its "
                        f"gain over {report['baseline']}; {report['speedup']:.1f}x faster than its fold ensemble")
        write_json(path, row)


def format_report(report: dict[str, Any]) -> str:
    """The report as the terminal shows it."""
    oof, test, t = report["oof_miou"], report["test_miou"], report["seconds_per_image"]
    lines = [f"distillation: {report['student']} from blend {report['blend']} (OOF mIoU, full resolution)",
             f"  {'':10s} {'OOF mIoU':>9s} {'test mIoU':>9s}",
             f"  {'baseline':10s} {_fmt(oof['baseline']):>9s} {_fmt(test['baseline']):>9s}  {report['baseline']}",
             f"  {'student':10s} {_fmt(oof['student']):>9s} {_fmt(test['student']):>9s}  {report['student']}",
             f"  {'blend':10s} {_fmt(oof['blend_nested']):>9s} {_fmt(test['blend']):>9s}  {report['blend']} "
             f"(nested CV)",
             f"recovered share of the blend's gain: {_fmt(report['recovered'], pct=True)} "
             f"= (student - baseline) / (blend - baseline)"
             + ("" if report["recovered"] is not None else " (none: the blend does not beat the baseline)"),
             "  per class: " + ", ".join(f"{c} {_fmt(v['recovered'], pct=True)}"
                                         for c, v in report["per_class"].items()),
             f"inference per image ({t['device']}, {t['images']} images, ensemble.predict, same run): fold ensemble "
             f"{1000 * t['ensemble']:.1f} ms ({report['passes']['ensemble']}), student {1000 * t['student']:.1f} ms "
             f"({report['passes']['student']}): {report['speedup']:.1f}x faster"]
    return "\n".join(lines)
