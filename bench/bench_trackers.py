"""The trackers' cost: one fold of the smoke recipe trained untracked, then tracked in TensorBoard, MLflow (SQLite)
and W&B (offline), in one process.

Each epoch's row goes to the trackers through ``kfold.track.Tracking.log_row``, timed on its own; its mean is
the trackers' cost per epoch, set against the untracked run's epoch (training + validation). Opening the runs
(imports, the MLflow database, W&B's service) and ending them (final metrics, the files' sha256) happen once per
fold, and are reported apart. The epochs of the two runs are shown side by side too, but on a shared machine
their difference is mostly noise: the timed calls are the figure.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common import fmt_s, make_root, parse_args, pick, result

from kfold.config import build_recipe
from kfold.data.layout import open_root
from kfold.distributed import setup_distributed
from kfold.splits import read_folds
from kfold.track import open_fold
from kfold.train import fit_fold

os.environ.setdefault("WANDB_MODE", "offline")


def train(recipe, root, out: Path, on_row: Callable[[dict], None]) -> list[float]:
    """Train fold 0 into ``out``; the wall time of each epoch (between successive rows)."""
    folds = read_folds(root)
    train_ids = [i for i in root.train_ids if folds[i] != 0]
    val_ids = [i for i in root.train_ids if folds[i] == 0]
    stamps = [time.perf_counter()]

    def row_done(row: dict) -> None:
        stamps.append(time.perf_counter())
        on_row(row)
        stamps[-1] = time.perf_counter()  # the next epoch starts after the trackers are done with this row

    fit_fold(recipe, root, out / recipe.name / "fold0", train_ids, val_ids, setup_distributed(), on_row=row_done)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    n_train, size, epochs, steps = pick(args.mode, (120, (96, 128), 8, 10), (60, (64, 96), 5, 6),
                                        (20, (32, 64), 2, 1))
    logging.getLogger("kfold").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_trackers_") as tmp:
        root = open_root(make_root(Path(tmp) / "root", n_train, size))
        base = {"schedule.epochs": epochs, "train.max_steps_per_epoch": steps, "data.input_size": size,
                "data.crop_size": size}
        plain = build_recipe({}, "smoke", base)
        plain.name = "untracked"
        plain_epochs = train(plain, root, Path(tmp) / "runs", lambda row: None)

        tracked = build_recipe({}, "smoke", {**base, "train.track": ["tensorboard", "mlflow", "wandb"]})
        tracked.name = "tracked"
        runs = Path(tmp) / "runs"
        t0 = time.perf_counter()
        tracking = open_fold(tracked, runs, 0)
        open_s = time.perf_counter() - t0
        log_times: list[float] = []

        def log_row(row: dict) -> None:
            t = time.perf_counter()
            tracking.log_row(row)
            log_times.append(time.perf_counter() - t)

        tracked_epochs = train(tracked, root, runs, log_row)
        run_dir = runs / "tracked" / "fold0"
        if len(tracking.names) != 3 or len(log_times) != epochs:  # a tracker failed (it warned) or rows are missing
            raise AssertionError(f"trackers still on: {tracking.names}; rows logged: {len(log_times)} of {epochs}")
        t0 = time.perf_counter()
        tracking.finish({"final/oof_miou": 0.5}, {"model.safetensors": run_dir / "model.safetensors"})
        finish_s = time.perf_counter() - t0
    epoch = statistics.median(plain_epochs)
    per_epoch = statistics.mean(log_times)
    shape = f"{epochs} epochs x {steps} steps, {size[0]}x{size[1]}"
    result("trackers", "cost per epoch, 3 trackers", fmt_s(per_epoch), "epoch", fmt_s(epoch), None,
           share=f"{100 * per_epoch / epoch:.2f}%", run=shape)
    result("trackers", "epoch, tracked vs untracked", fmt_s(statistics.median(tracked_epochs)), "untracked",
           fmt_s(epoch), epoch / statistics.median(tracked_epochs))
    result("trackers", "once per fold: open + finish", fmt_s(open_s + finish_s), "epoch", fmt_s(epoch), None,
           open=fmt_s(open_s), finish=fmt_s(finish_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
