"""The honest estimate of a blend: nested cross-validation over the folds of the OOF pixel sample.

Each outer fold's blend is fitted on the other folds' pixels only and scored on the held-out fold, so no
score peeks at the pixels its weights were fitted on. The fits are independent and each runs on one
thread (``fit_blend``), so they spread over worker processes: ``fit_pool`` gives the pool, shared with
the in-sample fit by ``ensemble/blend.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ensemble.optimize import BlendOptions, BlendResult, fit_blend, score_blend
from kfold.metrics import mean_iou


@dataclass
class FoldResult:
    """One outer fold of ``nested_cv``: the blend fitted without the fold and its held-out score."""

    fold: int
    fit: BlendResult
    confusion: np.ndarray  # weighted (C, C) confusion matrix of the held-out sample pixels
    miou: float


def fit_pool(workers: int) -> ProcessPoolExecutor | None:
    """A process pool for blend fits and passes, or None (run in this process) when ``workers`` <= 1.

    Workers are spawned, not forked: a fork of a process whose OpenMP pool is running can hang. Each
    worker exits when the blend that started it dies (see :func:`_exit_with_parent`).
    """
    if workers <= 1:
        return None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent: int) -> None:
    """Exit this worker once ``parent`` is gone: a killed blend (SIGKILL) never shuts its pool down, and its
    workers, waiting on a queue they hold both ends of, would otherwise stay for good (seen after a kill
    during the test pass)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def default_workers(n_fits: int) -> int:
    """One worker per fit, at most one per CPU this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(n_fits, cpus))


def fit_held_out(
    model_probs: Sequence[np.ndarray],
    labels: np.ndarray,
    sample_weight: np.ndarray,
    pixel_fold: np.ndarray,
    fold: int,
    num_classes: int,
    options: BlendOptions,
) -> FoldResult:
    """Fit a blend on every fold but ``fold`` and score it on ``fold`` (one outer fold of ``nested_cv``)."""
    train, held_out = pixel_fold != fold, pixel_fold == fold
    fit = fit_blend([p[train] for p in model_probs], labels[train], sample_weight[train], num_classes, options)
    cm = score_blend([p[held_out] for p in model_probs], labels[held_out], sample_weight[held_out], fit.weights,
                     fit.temperatures, num_classes)
    return FoldResult(fold=int(fold), fit=fit, confusion=cm, miou=float(mean_iou(cm)))


def nested_cv(
    model_probs: Sequence[np.ndarray],
    labels: np.ndarray,
    sample_weight: np.ndarray,
    pixel_fold: np.ndarray,
    num_classes: int,
    options: BlendOptions | None = None,
    executor: Executor | None = None,
) -> tuple[np.ndarray, list[FoldResult]]:
    """Nested-CV estimate of a blend: fit on the other folds' pixels, score each held-out fold.

    Args:
        model_probs, labels, sample_weight, num_classes: as in ``fit_blend``.
        pixel_fold: (P,) fold id of each sample pixel (the fold of its image).
        options: how ``fit_blend`` fits (default: ``BlendOptions()``).
        executor: runs the folds' fits (e.g. ``fit_pool``); None fits them one after another here. The
            results are the same either way: every fit is deterministic and single-threaded.

    Returns:
        (pooled weighted (C, C) confusion matrix of all held-out pixels, one ``FoldResult`` per fold).
    """
    pixel_fold = np.asarray(pixel_fold)
    if pixel_fold.shape != np.shape(labels):
        raise ValueError(f"pixel_fold has shape {pixel_fold.shape}, labels {np.shape(labels)}")
    folds = np.unique(pixel_fold)
    if len(folds) < 2:
        raise ValueError(f"nested CV needs >= 2 folds, pixel_fold holds {folds.tolist()}")
    args = (model_probs, labels, sample_weight, pixel_fold)
    options = options or BlendOptions()
    bar = tqdm(total=len(folds), desc="blend: nested CV", unit="fold", leave=False, disable=None)
    if executor is None:
        results = []
        for f in folds:
            results.append(fit_held_out(*args, int(f), num_classes, options))
            bar.update()
            bar.set_postfix(heldout_miou=f"{results[-1].miou:.4f}")
    else:
        futures: list[Future] = [executor.submit(fit_held_out, *args, int(f), num_classes, options)
                                 for f in folds]
        for done in as_completed(futures):
            bar.update()
            bar.set_postfix(heldout_miou=f"{done.result().miou:.4f}")
        results = [f.result() for f in futures]
    bar.close()
    pooled = np.zeros((num_classes, num_classes))
    for r in results:  # in fold order, so the pooled sum does not depend on which fit finished first
        pooled += r.confusion
    return pooled, results
