"""The blend's two passes at label resolution: OOF confusion matrices of every candidate, and the test class maps.

Each pass reads every image once: all candidate blends (in-sample, nested, global) and every member whose
score is not kept beside its store (``kfold.store.scores``) are scored from the same chunk. With a process
pool the images are split into parts, a few in flight at a time (bounded memory); a worker opens the stores
itself (memory maps are not sent between processes) and sends back confusion matrices or uint8 class maps.
Processes, not torch threads: the upsampling and the argmax are memory-bound, and a second intra-op thread
gains nothing on top of a process per core (``bench/bench_blend_size.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ensemble.optimize import TemperedCache
from ensemble.stores import Members, Params, blend_argmax, open_members
from kfold.metrics import confusion_matrix
from kfold.store.read import full_res_argmax
from kfold.store.scores import cached_confusion, keep_confusion

Blends = Mapping[str, Mapping[int, Params]]  # name -> {fold: (weights, temperatures)}


@functools.lru_cache(maxsize=4)
def _reopen(runs_dir: str, names: tuple[str, ...], root: str) -> Members:
    """The members, opened once per worker process, which then runs torch on one thread: with one process
    per core, a second OpenMP thread each oversubscribes the cores."""
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


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (memory the kernel can hand out, reclaimable cache included);
    None where there is no such file."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = [int(line.split()[1]) for line in lines if line.startswith("MemAvailable:")]
    return kib[0] * 1024 if kib else None


@contextlib.contextmanager
def warm_page_cache(paths: Sequence[Path], also_cached: int = 0, keep_free: int = 4 << 30) -> Iterator[int]:
    """Read ``paths`` once in a background thread while the block runs, so that a pass over them finds them in
    the page cache rather than waiting on the disk; yields the bytes it set out to read (0: skipped).

    A pass that faults a memory map in page by page waits on the disk, then computes, in turn; read during
    the OOF pass, which uses the CPUs and not the disk, the test stores are cached by the time the test pass
    needs them (``bench/bench_blend_size.py``). The OOF stores are read ahead of the sample pass likewise.
    The files are read round-robin, block by block, in about the row order a pass reads them. Skipped when the files,
    ``also_cached`` bytes that must stay cached beside them (the OOF stores the running pass reads) and
    ``keep_free`` bytes of heap would not fit in the available memory: evicting pages a pass still needs
    costs more than it saves. The thread stops when the block ends.
    """
    size = sum(p.stat().st_size for p in paths)
    available = _available_memory()
    if not paths or available is None or size + also_cached + keep_free > available:
        yield 0
        return
    stop = threading.Event()

    def read_all() -> None:
        buffer = bytearray(8 << 20)
        with contextlib.ExitStack() as files:
            open_files = [files.enter_context(open(p, "rb", buffering=0)) for p in paths]
            while open_files and not stop.is_set():
                open_files = [f for f in open_files if f.readinto(buffer)]

    def read_quietly() -> None:
        with contextlib.suppress(OSError):  # a store gone or unreadable: the pass itself will say so
            read_all()

    reader = threading.Thread(target=read_quietly, name="warm-page-cache", daemon=True)
    reader.start()
    try:
        yield size
    finally:
        stop.set()
        reader.join()


def release_freed_heap() -> None:
    """Hand memory freed by this process back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks below its mmap threshold (which grows as large blocks are freed) in the heap, and
    a pass over a store frees thousands of chunk arrays: without a trim the blend's process keeps that memory
    while the fits' workers, started next, need theirs (peak heap in ``bench/bench_blend_size.py``).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _score_part(members: Members | tuple, ids: Sequence[str], blends: Blends, chunk: int, scored: Sequence[int]
                ) -> dict[str, np.ndarray]:
    """Confusion matrices of ``ids`` (see :func:`score_full_res`), blends and the members ``scored`` (indices);
    ``members`` or its ``reopen_args()``."""
    if isinstance(members, tuple):
        members = _reopen(members[0], tuple(members[1]), members[2])
    C, size = members.num_classes, members.image_size
    cms = {name: np.zeros((C, C), dtype=np.int64) for name in (*blends, *(members.names[m] for m in scored))}
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
                cm = confusion_matrix(labels[sel.numpy()], pred, C)
                cms[name] += cm
                cms[f"{name}@fold{int(f)}"] = cms.get(f"{name}@fold{int(f)}", 0) + cm
        for m in scored:  # from the stored resolution, exactly as kfold.store.read.score_experiment scores a store
            cms[members.names[m]] += confusion_matrix(labels, full_res_argmax(raw[m], size).numpy(), C)
    return cms


def _member_scores(members: Members, split: str) -> tuple[dict[str, np.ndarray], list[int]]:
    """(kept confusion matrices by member name, indices of the members to score) for ``split``."""
    kept = {s.name: cm for s in members.stores if (cm := cached_confusion(s, members.root, split)) is not None}
    return kept, [m for m, name in enumerate(members.names) if name not in kept]


def score_full_res(members: Members, blends: Blends, chunk: int, score_members: bool = False,
                   pool: Executor | None = None, workers: int = 1, keep_scores: bool = False
                   ) -> dict[str, np.ndarray]:
    """Confusion matrices at full resolution over every OOF pixel, in one streamed pass.

    Args:
        members: the blend's stores.
        blends: name -> {fold: (weights, temperatures)}: each image is blended with its own fold's
            parameters (the same ones for every fold for an in-sample blend; per fold for nested CV).
        chunk: images per streamed chunk (and per task sent to a worker).
        score_members: also score each member's stored probabilities as they are (as ``score_experiment``),
            or take the score kept beside its store (``kfold.store.scores``).
        pool: worker processes to share the images; None: this process.
        workers: the pool's size (tasks in flight: two per worker).
        keep_scores: keep the members' scores made here beside their stores.

    Returns:
        name (and member name) -> (C, C) int64 confusion matrix; ``<name>@fold<k>``: a blend's on fold k's images.
    """
    # Fold by fold: a chunk then mostly holds one fold (no per-fold copies) and reads one fold's store.
    ids = sorted(members.ids, key=lambda i: (members.fold_of[i], i))
    parts = [ids[start : start + chunk] for start in range(0, len(ids), chunk)]
    source = members.reopen_args() if pool is not None else members
    kept, scored = _member_scores(members, "oof") if score_members else ({}, [])
    total = {name: np.zeros((members.num_classes,) * 2, dtype=np.int64)
             for name in (*blends, *(members.names[m] for m in scored))}
    with tqdm(total=len(ids), desc="blend: full-res OOF score", unit="img", leave=False, disable=None) as bar:
        for part, cms in zip(parts, _in_order(pool, _score_part, ((source, p, blends, chunk, scored)
                                                                   for p in parts), 2 * workers)):
            for name, cm in cms.items():
                total[name] = total.get(name, 0) + cm
            bar.update(len(part))
    if keep_scores:
        for m in scored:
            keep_confusion(members.stores[m], members.root, "oof", total[members.names[m]])
    return {**total, **kept}


def _predict_part(members: Members | tuple, rows: range, params: Params, chunk: int, with_labels: bool,
                  scored: Sequence[int]) -> tuple[list[str], np.ndarray, np.ndarray | None, list[np.ndarray]]:
    """(ids, uint8 (n, H, W) class maps, the blend's confusion or None, the confusion of each member in
    ``scored``) of test ``rows``."""
    if isinstance(members, tuple):
        members = _reopen(members[0], tuple(members[1]), members[2])
    C, size = members.num_classes, members.image_size
    cm = np.zeros((C, C), dtype=np.int64) if with_labels else None
    member_cms = [np.zeros((C, C), dtype=np.int64) for _ in scored]
    ids, preds = [], []
    for part, raw in members.iter_test(chunk, rows, on_grid=False):
        pred = blend_argmax([members.on_grid(p) for p in raw], params, size).numpy()
        if with_labels:
            labels = members.labels(part, "test")
            cm += confusion_matrix(labels, pred, C)
            for member_cm, m in zip(member_cms, scored):  # from the stored resolution, as the store is scored
                member_cm += confusion_matrix(labels, full_res_argmax(raw[m], size).numpy(), C)
        ids += part
        preds.append(pred)
    return ids, np.concatenate(preds), cm, member_cms


def predict_test(members: Members, params: Params, chunk: int, cm: np.ndarray | None = None,
                 member_cms: Sequence[np.ndarray] | None = None, pool: Executor | None = None, workers: int = 1,
                 keep_scores: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(test id, (H, W) uint8 class map)`` of the blend, in test-id order.

    Args:
        members: the blend's stores (each member's test probabilities are averaged over its folds).
        params: (weights, temperatures).
        chunk: images per streamed chunk (and per task sent to a worker).
        cm: when given (the root must have test labels), the (C, C) confusion of the blend is added to it.
        member_cms: likewise, one (C, C) matrix per member, for each member's stored predictions alone (or
            the score kept beside its store, ``kfold.store.scores``).
        pool: worker processes to share the images; None: this process.
        workers: the pool's size (tasks in flight: two per worker).
        keep_scores: keep the members' scores made here beside their stores.
    """
    n = len(members.test_ids)
    kept, scored = _member_scores(members, "test") if member_cms is not None else ({}, [])
    tasks = ((members.reopen_args() if pool is not None else members, range(start, min(start + chunk, n)), params,
              chunk, cm is not None, scored) for start in range(0, n, chunk))
    with tqdm(total=n, desc="blend: test", unit="img", leave=False, disable=None) as bar:
        for ids, preds, part_cm, part_member_cms in _in_order(pool, _predict_part, tasks, 2 * workers):
            if cm is not None:
                cm += part_cm
                for m, part in zip(scored, part_member_cms):
                    member_cms[m] += part
            bar.update(len(ids))
            yield from zip(ids, preds)
    for m, store in enumerate(members.stores):
        if store.name in kept:
            member_cms[m] += kept[store.name]
        elif keep_scores and member_cms is not None:
            keep_confusion(store, members.root, "test", member_cms[m])
