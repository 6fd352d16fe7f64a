"""The blend's two passes at label resolution: OOF confusion matrices of every candidate, and the test class maps.

Each pass reads every image once: all candidate blends (in-sample, nested, global) and every member are
scored from the same chunk. With a process pool the images are split into parts, a few in flight at a
time (bounded memory); a worker opens the stores itself (memory maps are not sent between processes) and
sends back confusion matrices or uint8 class maps. Processes, not torch threads: the upsampling and the
argmax are memory-bound, and a second intra-op thread gained nothing on 2 cores (measured).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ensemble.optimize import TemperedCache
from ensemble.stores import Members, Params, blend_argmax, open_members
from kfold.metrics import confusion_matrix
from kfold.store.read import full_res_argmax

Blends = Mapping[str, Mapping[int, Params]]  # name -> {fold: (weights, temperatures)}


@functools.lru_cache(maxsize=4)
def _reopen(runs_dir: str, names: tuple[str, ...], root: str) -> Members:
    """The members, opened once per worker process, which then runs torch on one thread: with one process
    per core, a second OpenMP thread each oversubscribes the cores (measured at NYUv2 size on 2 cores: the
    test pass took 211 s with torch's default 2 threads per worker, against ~45 s expected from one process)."""
    torch.set_num_threads(1)
    return open_members(runs_dir, list(names), root)[0]


def _in_order(pool: Executor | None, fn: Callable, tasks: Iterable[tuple], ahead: int) -> Iterator[Any]:
    """``fn(*task)`` for each task, in order; with a pool at most ``ahead`` tasks in flight."""
    if pool is None:
        yield from (fn(*task) for task in tasks)
        return
    pending: deque[Future] = deque()
    for task in tasks:
        pending.append(pool.submit(fn, *task))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _score_part(members: Members | tuple, ids: Sequence[str], blends: Blends, chunk: int, score_members: bool
                ) -> dict[str, np.ndarray]:
    """Confusion matrices of ``ids`` (see :func:`score_full_res`); ``members`` or its ``reopen_args()``."""
    if isinstance(members, tuple):
        members = _reopen(members[0], tuple(members[1]), members[2])
    C, size = members.num_classes, members.image_size
    cms = {name: np.zeros((C, C), dtype=np.int64) for name in (*blends, *(members.names if score_members else ()))}
    for part, raw in members.iter_oof(chunk, ids, on_grid=False):
        probs = [members.on_grid(p) for p in raw]
        labels = members.labels(part)
        fold = np.asarray([members.fold_of[i] for i in part])
        for f in np.unique(fold):
            sel = torch.from_numpy(np.flatnonzero(fold == f))
            fold_probs = probs if len(sel) == len(fold) else [p[sel] for p in probs]
            tempered = TemperedCache(fold_probs)
            for name, by_fold in blends.items():
                pred = blend_argmax(fold_probs, by_fold[int(f)], size, tempered).numpy()
                cms[name] += confusion_matrix(labels[sel.numpy()], pred, C)
        if score_members:
            for name, p in zip(members.names, raw):
                # From the stored resolution, exactly as kfold.store.read.score_experiment scores a store.
                cms[name] += confusion_matrix(labels, full_res_argmax(p, size).numpy(), C)
    return cms


def score_full_res(members: Members, blends: Blends, chunk: int, score_members: bool = False,
                   pool: Executor | None = None, workers: int = 1) -> dict[str, np.ndarray]:
    """Confusion matrices at full resolution over every OOF pixel, in one streamed pass.

    Args:
        members: the blend's stores.
        blends: name -> {fold: (weights, temperatures)}: each image is blended with its own fold's
            parameters (the same ones for every fold for an in-sample blend; per fold for nested CV).
        chunk: images per streamed chunk (and per task sent to a worker).
        score_members: also score each member's stored probabilities as they are (as ``score_experiment``).
        pool: worker processes to share the images; None: this process.
        workers: the pool's size (tasks in flight: two per worker).

    Returns:
        name (and member name) -> (C, C) int64 confusion matrix.
    """
    # Fold by fold: a chunk then mostly holds one fold (no per-fold copies) and reads one fold's store.
    ids = sorted(members.ids, key=lambda i: (members.fold_of[i], i))
    parts = [ids[start : start + chunk] for start in range(0, len(ids), chunk)]
    source = members.reopen_args() if pool is not None else members
    total: dict[str, np.ndarray] = {}
    with tqdm(total=len(ids), desc="blend: full-res OOF score", unit="img", leave=False, disable=None) as bar:
        for part, cms in zip(parts, _in_order(pool, _score_part, ((source, p, blends, chunk, score_members)
                                                                   for p in parts), 2 * workers)):
            for name, cm in cms.items():
                total[name] = total.get(name, 0) + cm
            bar.update(len(part))
    return total


def _predict_part(members: Members | tuple, rows: range, params: Params, chunk: int, with_labels: bool
                  ) -> tuple[list[str], np.ndarray, np.ndarray | None, list[np.ndarray] | None]:
    """(ids, uint8 (n, H, W) class maps, the blend's and each member's confusion or None) of test ``rows``."""
    if isinstance(members, tuple):
        members = _reopen(members[0], tuple(members[1]), members[2])
    C, size = members.num_classes, members.image_size
    cm = np.zeros((C, C), dtype=np.int64) if with_labels else None
    member_cms = [np.zeros((C, C), dtype=np.int64) for _ in members.names] if with_labels else None
    ids, preds = [], []
    for part, probs in members.iter_test(chunk, rows):
        pred = blend_argmax(probs, params, size).numpy()
        if with_labels:
            labels = members.labels(part, "test")
            cm += confusion_matrix(labels, pred, C)
            for member_cm, p in zip(member_cms, probs):
                member_cm += confusion_matrix(labels, full_res_argmax(p, size).numpy(), C)
        ids += part
        preds.append(pred)
    return ids, np.concatenate(preds), cm, member_cms


def predict_test(members: Members, params: Params, chunk: int, cm: np.ndarray | None = None,
                 member_cms: Sequence[np.ndarray] | None = None, pool: Executor | None = None, workers: int = 1
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(test id, (H, W) uint8 class map)`` of the blend, in test-id order.

    Args:
        members: the blend's stores (each member's test probabilities are averaged over its folds).
        params: (weights, temperatures).
        chunk: images per streamed chunk (and per task sent to a worker).
        cm: when given (the root must have test labels), the (C, C) confusion of the blend is added to it.
        member_cms: likewise, one (C, C) matrix per member, for each member's predictions alone.
        pool: worker processes to share the images; None: this process.
        workers: the pool's size (tasks in flight: two per worker).
    """
    n = len(members.test_ids)
    tasks = ((members.reopen_args() if pool is not None else members, range(start, min(start + chunk, n)), params,
              chunk, cm is not None) for start in range(0, n, chunk))
    with tqdm(total=n, desc="blend: test", unit="img", leave=False, disable=None) as bar:
        for ids, preds, part_cm, part_member_cms in _in_order(pool, _predict_part, tasks, 2 * workers):
            if cm is not None:
                cm += part_cm
                for total, part in zip(member_cms or [], part_member_cms):
                    total += part
            bar.update(len(ids))
            yield from zip(ids, preds)
