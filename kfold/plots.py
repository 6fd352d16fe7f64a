"""Plots a person would rather look at: training curves per fold, a qualitative grid of OOF images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from foldwise.figures import class_colours, save_figure  # noqa: E402
from kfold.data.layout import IGNORE_INDEX, DataRoot, read_depth, read_rgb  # noqa: E402
from kfold.store.read import ExperimentStore, full_res_argmax  # noqa: E402


def plot_curves(metrics_csv: Path, path: Path) -> None:
    """Losses, learning rate and validation mIoU / pixel accuracy per epoch from a fold's ``metrics.csv``."""
    rows = pd.read_csv(metrics_csv)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    parts = [c for c in rows.columns if c.startswith("train_") and c != "train_total" and rows[c].abs().sum() > 0]
    for column in parts + ["train_total"]:
        axes[0].plot(rows["epoch"], rows[column], marker=".", label=column.removeprefix("train_"),
                     linewidth=2.5 if column == "train_total" else 1.2)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[0].legend(fontsize=8)
    axes[1].plot(rows["epoch"], rows["lr"], marker=".")
    axes[1].set(title="learning rate (decoder; end of epoch)", xlabel="epoch")
    axes[2].plot(rows["epoch"], rows["val_miou"], marker=".", label="mIoU")
    axes[2].plot(rows["epoch"], rows["val_pixel_acc"], marker=".", label="pixel accuracy")
    axes[2].set(title="validation (EMA weights)", xlabel="epoch", ylim=(0, 1))
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{metrics_csv.parent.parent.name} / {metrics_csv.parent.name}", y=1.03)
    save_figure(fig, path)


def plot_qualitative(store: ExperimentStore, root: DataRoot, path: Path, n_images: int = 4) -> None:
    """Rows of OOF images: RGB | depth | label | prediction | error (red = wrong, grey = ignored)."""
    ids = store.ids[:: max(1, len(store.ids) // n_images)][:n_images]
    colours = class_colours(store.num_classes)
    depth_cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # no sensor reading
    fig, axes = plt.subplots(len(ids), 5, figsize=(15, 2.6 * len(ids)), squeeze=False)
    for row, (image_id, probs) in enumerate((i, p) for chunk_ids, chunk in store.iter_oof(len(ids), ids)
                                            for i, p in zip(chunk_ids, chunk)):
        label = root.label("train", image_id)
        pred = full_res_argmax(torch.from_numpy(probs[None]), label.shape)[0].numpy()
        ignored = label == IGNORE_INDEX
        wrong = (pred != label) & ~ignored
        error = np.where(ignored[..., None], 128, np.where(wrong[..., None], [220, 30, 30], 255)).astype(np.uint8)
        depth = read_depth(root.depth_path("train", image_id)) if root.has_depth else np.zeros(label.shape, np.float32)
        accuracy = 1.0 - wrong.sum() / max(1, (~ignored).sum())
        panels = [("RGB", read_rgb(root.image_path("train", image_id))),
                  ("depth (m; white = no reading)", np.ma.masked_equal(depth, 0)),
                  ("label (black = ignored)", colours[np.where(ignored, store.num_classes, label)]),
                  (f"prediction (pixel acc {accuracy:.2f})", colours[pred]),
                  ("error (red = wrong, grey = ignored)", error)]
        for col, (title, panel) in enumerate(panels):
            ax = axes[row, col]
            shown = ax.imshow(panel, cmap=depth_cmap if panel.ndim == 2 else None)
            if panel.ndim == 2:
                fig.colorbar(shown, ax=ax, fraction=0.035, pad=0.02)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{image_id}: {title}" if col == 0 else title, fontsize=9)
    handles = [matplotlib.patches.Patch(color=colours[i] / 255, label=name) for i, name in enumerate(store.classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(7, len(handles)), fontsize=8)
    fig.suptitle(f"{store.name}: OOF predictions (fold models on images they did not train on)")
    save_figure(fig, path)
