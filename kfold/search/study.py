"""The Optuna study of a search: its storage, its sampler and pruner, and trials whose worker died.

Storage by setting (``--storage``):

- default: a SQLite file in the study folder, for one machine. Each process has its own engine, SQLite's busy
  timeout makes a writer wait for the lock instead of failing with "database is locked" (optuna#820).
- ``journal:PATH``: Optuna's journal file (an append-only log with a lock file beside it), for a cluster with
  a shared file system and no database server (optuna#4994 is SQLite on such a file system).
- any SQLAlchemy URL (``postgresql://...``, ``mysql://...``): a database server, for many workers.

A trial records the host and pid of the process that runs it and refreshes ``alive_at`` while it runs. One
whose process is gone (same host) or that has not been refreshed for ``STALE_S`` is failed by the next worker
that looks, and its parameters are queued again with its run folder (Optuna's ``RetryFailedTrialCallback``),
so the retry reuses the folds that finished.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from foldwise.io import pid_alive

STALE_S = 600  # a running trial not refreshed for this long counts as dead (another host's worker)
HEARTBEAT_S = 30
MAX_RETRY = 3
PRUNERS = ("wilcoxon", "median", "none")
SAMPLERS = ("tpe", "random")


def storage_url(spec: str | None, study_dir: Path) -> str:
    """The storage as the user would pass it to ``optuna-dashboard`` or ``optuna.load_study``."""
    if spec is None:
        return f"sqlite:///{(study_dir.resolve() / 'study.db').as_posix()}"
    return spec


def open_storage(spec: str | None, study_dir: Path) -> Any:
    """An Optuna storage for ``--storage`` (None: SQLite in ``study_dir``; ``journal:PATH``; a SQLAlchemy URL)."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if spec is not None and spec.startswith("journal:"):
        path = Path(spec.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    url = storage_url(spec, study_dir)
    if url.startswith("sqlite:"):
        study_dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        kwargs = {"pool_pre_ping": True}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return RDBStorage(url, engine_kwargs=kwargs)


def make_pruner(name: str, p_threshold: float) -> Any:
    """``wilcoxon``: Optuna's WilcoxonPruner (paired folds against the best trial); ``median``: the median of the
    other trials' scores on the same fold; ``none``."""
    from optuna.pruners import MedianPruner, NopPruner, WilcoxonPruner

    if name == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks it experimental
            return WilcoxonPruner(p_threshold=p_threshold, n_startup_steps=2)
    if name == "median":
        return MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return NopPruner()


def make_sampler(name: str, seed: int) -> Any:
    from optuna.samplers import RandomSampler, TPESampler

    return RandomSampler(seed=seed) if name == "random" else TPESampler(seed=seed)


def mark_alive(study: Any, trial_id: int) -> None:
    study._storage.set_trial_user_attr(trial_id, "alive_at", time.time())


def claim(study: Any, trial: Any, folder: str) -> None:
    """Record who runs ``trial`` and where its run folder is."""
    for key, value in {"host": socket.gethostname(), "pid": os.getpid(), "alive_at": time.time(),
                       "folder": folder}.items():
        trial.set_user_attr(key, value)


class Heartbeat:
    """Refresh a running trial's ``alive_at`` every ``HEARTBEAT_S`` from a thread, while its folds run."""

    def __init__(self, study: Any, trial_id: int) -> None:
        self.study, self.trial_id, self.stop = study, trial_id, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="search-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                mark_alive(self.study, self.trial_id)
            except Exception:  # noqa: BLE001,S112 - a missed beat only risks a retry, never the trial itself
                continue

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def is_stale(trial: Any, now: float) -> bool:
    attrs = trial.user_attrs
    if attrs.get("host") == socket.gethostname() and attrs.get("pid") is not None:
        return not pid_alive(attrs["pid"])
    return now - float(attrs.get("alive_at", now)) > STALE_S


def retry_stale(study: Any) -> list[int]:
    """Fail every running trial whose worker is gone and queue its parameters again; the trials retried."""
    from optuna.storages import RetryFailedTrialCallback
    from optuna.trial import TrialState

    retried, now = [], time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, now):
            continue
        try:  # another worker may fail it first: then it is that worker's to retry
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception:  # noqa: BLE001,S112
            continue
        RetryFailedTrialCallback(max_retry=MAX_RETRY)(study, study._storage.get_trial(trial._trial_id))
        retried.append(trial.number)
    return retried


def finished(study: Any) -> int:
    """Trials that count towards ``--trials``: complete or pruned."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
