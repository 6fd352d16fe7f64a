"""OOF report of one experiment: pooled full-resolution mIoU, per-class IoU, temperature table, plots.

Writes ``runs/<exp>/oof_report.csv``, ``runs/<exp>/plots/{per_class_iou,confusion}.png`` and
``runs/<exp>/leaderboard_row.json`` (picked up by the submissions package; kfold never imports it).

Usage:
    python -m kfold.report exp093_5 [exp093_4 ...] [--runs runs] [--data-root DIR]
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.figures import save_figure
from foldwise.io import write_json, write_text
from foldwise.leaderboard import leaderboard_row
from kfold.data.layout import DataRoot
from kfold.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from kfold.plots import plot_qualitative
from kfold.store.format import StoreError, list_experiments
from kfold.store.read import ExperimentStore, full_res_argmax, open_experiment, resolve_root, score_experiment
from kfold.store.scores import keep_confusion
from kfold.store.write import final_table, format_final_table
from kfold.track import experiment_links

POOLED = "pooled confusion matrices"
MEAN_OF_FOLDS = "mean of fold mIoUs"


def temperature_table(store: ExperimentStore) -> tuple[list[dict[str, float]], str]:
    """Per-temperature OOF mIoU of the experiment and how the folds were combined.

    Pools the folds' ``oof_temperature_cm.npy`` (one confusion matrix over all images, the mIoU convention);
    when a fold lacks it, falls back to the mean of the folds' ``oof_temperature.csv`` mIoUs, labelled so.

    Returns:
        (rows of ``temperature``, ``miou``, ``pixel_acc``; the method, :data:`POOLED` or :data:`MEAN_OF_FOLDS`)
    """
    C = store.num_classes
    grids, cms = [], []
    for fa in store.fold_arrays:
        grids.append(tuple(fa.manifest.temperatures))
        path = fa.path / fa.manifest.scores.get("temperature_cm_file", "oof_temperature_cm.npy")
        cms.append(np.load(path) if path.is_file() else None)
    if all(cm is not None for cm in cms) and len(set(grids)) == 1 and grids[0]:
        for fa, cm in zip(store.fold_arrays, cms):
            if cm.shape != (len(grids[0]), C, C):
                raise StoreError(f"{store.name} fold {fa.fold}: {fa.path / 'oof_temperature_cm.npy'} shape "
                                 f"{cm.shape}, expected {(len(grids[0]), C, C)}")
        pooled = np.sum(cms, axis=0)
        return [{"temperature": t, "miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm)}
                for t, cm in zip(grids[0], pooled)], POOLED

    per_t: dict[float, list[tuple[float, float]]] = {}
    for fa in store.fold_arrays:
        path = fa.path / "oof_temperature.csv"
        if not path.is_file():
            raise StoreError(f"{store.name} fold {fa.fold}: {path} missing")
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                per_t.setdefault(float(row["temperature"]), []).append(
                    (float(row["miou"]), float(row["pixel_acc"])))
    rows = [{"temperature": t, "miou": float(np.mean([m for m, _ in v])),
             "pixel_acc": float(np.mean([a for _, a in v]))}
            for t, v in sorted(per_t.items()) if len(v) == store.folds]  # only temperatures every fold tried
    return rows, MEAN_OF_FOLDS


def depth_summary(store: ExperimentStore) -> dict[str, float] | None:
    """OOF depth RMSE / AbsRel / delta1 (metres, against the sensor): the mean of the folds' figures.

    The folds record their metrics, not the sums behind them, so this is a mean of folds (folds of about equal
    size weigh about equally); None when a fold has no depth head.
    """
    per_fold = [store.manifest(f).scores.get("oof_depth") for f in range(store.folds)]
    if not all(isinstance(d, dict) for d in per_fold):
        return None
    return {k: float(np.mean([d[k] for d in per_fold])) for k in ("rmse", "absrel", "delta1")}


def _read_final(path: Path) -> dict[str, dict[str, float]]:
    """A fold's ``final_metrics.csv`` as ``{column: {metric: value}}`` (nan for empty cells)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    columns = rows[0][1:]
    return {c: {r[0]: float(r[i + 1]) if r[i + 1] else math.nan for r in rows[1:]} for i, c in enumerate(columns)}


def test_confusion(store: ExperimentStore, root: DataRoot, chunk: int = 64) -> np.ndarray:
    """(C, C) confusion matrix of the fold-averaged test prediction against the root's test labels."""
    C = store.num_classes
    cm = np.zeros((C, C), dtype=np.int64)
    for ids, probs in store.iter_test(chunk):
        labels = np.stack([root.label("test", i) for i in ids])
        cm += confusion_matrix(labels, full_res_argmax(torch.from_numpy(probs), store.image_size).numpy(), C)
    return cm


def experiment_final_metrics(store: ExperimentStore, root: DataRoot, chunk: int = 64
                             ) -> dict[str, dict[str, float | None]] | None:
    """The folds' validation / test table averaged over folds, and the fold-averaged test prediction's score.

    None when a fold has no ``final_metrics.csv`` (stores written before it existed).
    """
    paths = [fa.path / "final_metrics.csv" for fa in store.fold_arrays]
    if not all(p.is_file() for p in paths):
        return None
    per_fold = [_read_final(p) for p in paths]
    table = {f"{column} (mean of folds)": {m: float(np.nanmean([f[column][m] for f in per_fold]))
                                           if any(not math.isnan(f[column][m]) for f in per_fold) else None
                                           for m in per_fold[0][column]}
             for column in per_fold[0]}
    if root.has_test_labels:
        cm = test_confusion(store, root, chunk)
        keep_confusion(store, root, "test", cm)  # a blend reuses it
        iou = iou_per_class(cm)
        table["test (fold-averaged prediction)"] = {
            "pixel_acc": pixel_accuracy(cm), "miou": mean_iou(cm),
            **{f"iou_{c}": (None if math.isnan(v) else float(v)) for c, v in zip(store.classes, iou)}}
    return table


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    h, w = report["image_size"]
    lines = [
        f"{report['name']}: OOF over {report['folds']} folds, {report['n_images']} images, scored at {h}x{w}",
        f"mIoU {report['oof_miou']:.4f}   pixel acc {report['pixel_acc']:.4f}",
    ]
    depth = report.get("depth")
    if depth:
        lines.append(f"depth (metres, vs the sensor, mean of folds): RMSE {depth['rmse']:.4f}   "
                     f"AbsRel {depth['absrel']:.4f}   delta1 {depth['delta1']:.4f}")
    lines += [
        "",
        f"{'class':<16}{'IoU':>8}",
    ]
    lines += [f"{c:<16}{v:>8.4f}" for c, v in report["per_class_iou"].items()]
    lines += ["", f"{'temperature':<16}{'mIoU':>8}{'pix acc':>9}   ({report['temperature_method']})"]
    lines += [f"{r['temperature']:<16.2f}{r['miou']:>8.4f}{r['pixel_acc']:>9.4f}" for r in report["temperature_table"]]
    return "\n".join(lines)


def _report_csv(report: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [("oof_miou", report["oof_miou"]), ("pixel_acc", report["pixel_acc"]),
                                   ("n_images", report["n_images"]), ("folds", report["folds"])]
    rows += [(f"depth_{k}", v) for k, v in (report.get("depth") or {}).items()]
    rows += [(f"iou_{c}", v) for c, v in report["per_class_iou"].items()]
    kind = "miou_pooled" if report["temperature_method"] == POOLED else "miou_mean_of_folds"
    for r in report["temperature_table"]:
        rows += [(f"{kind}@T={r['temperature']:g}", r["miou"]), (f"pixel_acc@T={r['temperature']:g}", r["pixel_acc"])]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "value"])
    writer.writerows(rows)
    return buf.getvalue()


def plot_per_class_iou(per_class: dict[str, float], miou: float, path: Path, title: str) -> None:
    """Horizontal bar plot of the per-class IoU with the mIoU as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_class)
    values = [0.0 if math.isnan(v) else v for v in per_class.values()]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1.2))
    ax.barh(names, values, color="tab:blue")
    ax.axvline(miou, color="tab:red", linestyle="--", label=f"mIoU {miou:.3f}")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_title(title)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (each target class sums to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(0.45 * n + 2, 0.45 * n + 1.5))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("target")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path)


def experiment_report(
    runs_dir: str | Path, name: str, root: DataRoot | str | Path | None = None, chunk: int = 64
) -> dict[str, Any]:
    """Score one experiment's OOF store, print the table and write the report files.

    Args:
        runs_dir: folder of the experiments.
        name: experiment name.
        root: the dataset root (default: the root the folds recorded).
        chunk: images scored at a time.

    Returns:
        ``name``, ``folds``, ``n_images``, ``image_size``, ``oof_miou``, ``pixel_acc``, ``per_class_iou``,
        ``confusion_matrix``, ``temperature_table``, ``temperature_method`` and ``files``.
    """
    store = open_experiment(runs_dir, name)
    score = score_experiment(store, root, chunk=chunk)
    keep_confusion(store, resolve_root(root, store), "oof", score["confusion_matrix"])  # a blend reuses it
    table, method = temperature_table(store)
    report = {
        "name": name,
        "folds": store.folds,
        "n_images": score["n_images"],
        "image_size": list(store.image_size),
        "oof_miou": score["miou"],
        "pixel_acc": score["pixel_acc"],
        "per_class_iou": score["per_class_iou"],
        "confusion_matrix": score["confusion_matrix"],
        "temperature_table": table,
        "temperature_method": method,
        "depth": depth_summary(store),
    }
    print(format_report(report))
    final = experiment_final_metrics(store, resolve_root(root, store), chunk)
    if final is not None:
        write_text(store.path / "final_metrics.csv", final_table(final))
        print(f"\nfinal metrics ({store.path / 'final_metrics.csv'}):\n"
              f"{format_final_table(final_table(final))}")

    exp_dir = store.path
    files = {"csv": exp_dir / "oof_report.csv", "per_class_iou": exp_dir / "plots" / "per_class_iou.png",
             "confusion": exp_dir / "plots" / "confusion.png", "leaderboard_row": exp_dir / "leaderboard_row.json"}
    write_text(files["csv"], _report_csv(report))
    plot_per_class_iou(score["per_class_iou"], score["miou"], files["per_class_iou"], f"{name}: OOF per-class IoU")
    plot_confusion(score["confusion_matrix"], store.classes, files["confusion"],
                   f"{name}: OOF confusion (row-normalised)")
    files["qualitative"] = exp_dir / "plots" / "qualitative.png"
    plot_qualitative(store, resolve_root(root, store), files["qualitative"])
    # One model: nothing is fitted on its OOF, so there is no optimism to remove (nested = in-sample).
    row = leaderboard_row(name=name, kind="experiment", members=name, oof_miou=score["miou"],
                          oof_miou_nested=score["miou"], pixel_acc=score["pixel_acc"],
                          per_class_iou=score["per_class_iou"], depth=report["depth"],
                          trackers=experiment_links(exp_dir))
    write_json(files["leaderboard_row"], row)
    report["files"] = files
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m kfold.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="experiments (default: every one under --runs)")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--data-root", type=Path, default=None, help="default: the root the folds recorded")
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args(argv)

    def body() -> None:
        if args.chunk < 1:
            raise ValueError(f"--chunk {args.chunk}: must be at least 1")
        names = args.names or list_experiments(args.runs)
        if not names:
            raise FileNotFoundError(f"{args.runs}: no experiments found")
        for name in names:
            experiment_report(args.runs, name, args.data_root, args.chunk)
            print()

    return run_entry_point(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
