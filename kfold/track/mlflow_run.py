"""MLflow runs of an experiment: a parent run per experiment, a child run per fold, a run per blend.

Written through ``MlflowClient`` (never the fluent ``mlflow.start_run``, whose global active run does not mix
with several runs in one process): params = the flattened recipe, one ``log_batch`` per ``metrics.csv`` row,
the fold's files by reference (path + sha256 tags), nothing uploaded. SQLite answers "database is locked" to
a writer that waits longer than its busy timeout while parallel fold jobs write (mlflow PR #6490): every
write here is retried with back-off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from foldwise.io import write_json
from kfold.config import Recipe

T = TypeVar("T")
RETRIES = 12
MAX_PARAMS = 100  # MLflow's limit of params per log_batch call
MAX_VALUE = 6000  # ... and of one param value's length

# An unreachable server costs seconds, not MLflow's default minutes of retries (the user's settings win).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def retried(call: Callable[[], T]) -> T:
    """``call()``, again after a pause while SQLite says the database is locked or busy."""
    for attempt in range(RETRIES):
        try:
            return call()
        except Exception as err:
            text = str(err).lower()
            if attempt == RETRIES - 1 or ("database is locked" not in text and "database is busy" not in text):
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


def client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``; a SQLite file is created and migrated here when new."""
    from mlflow.tracking import MlflowClient

    from kfold.track import check_folder

    if uri.startswith("sqlite:///"):  # SQLite would open a read-only file read-write as root
        db = Path(uri.removeprefix("sqlite:///"))
        check_folder(db.parent)
        if db.exists() and not db.stat().st_mode & 0o222:
            raise PermissionError(f"{db}: not writable")

    for noisy in ("mlflow", "alembic"):  # a new database's migration prints a dozen INFO lines (set after import:
        logging.getLogger(noisy).setLevel(logging.WARNING)  # mlflow configures its loggers when imported)
    return retried(lambda: MlflowClient(tracking_uri=uri))


def experiment_id(mlflow: Any, name: str) -> str:
    """The id of the MLflow experiment ``name``, created when missing (by whichever process gets there first)."""
    found = retried(lambda: mlflow.get_experiment_by_name(name))
    if found is not None:
        return found.experiment_id
    try:
        return retried(lambda: mlflow.create_experiment(name))
    except Exception:  # another process created it in between
        found = retried(lambda: mlflow.get_experiment_by_name(name))
        if found is None:
            raise
        return found.experiment_id


def log_params(mlflow: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_VALUE]) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS):
        retried(lambda s=start: mlflow.log_batch(run_id, params=items[s : s + MAX_PARAMS]))


def _alive(mlflow: Any, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return retried(lambda: mlflow.get_run(run_id)).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - deleted, or from another database: start a new one
        return False


def parent_run(recipe: Recipe, exp_dir: Path, uri: str) -> dict[str, str]:
    """The experiment's parent run (``runs/<experiment>/trackers.json``), made when missing or when it lives in
    another store; call under the experiment's tracker lock."""
    from kfold.track import MLFLOW_EXPERIMENT, RECORD, read_record

    record = read_record(exp_dir / RECORD)
    known = record.get("mlflow") or {}
    mlflow = client(uri)
    if known.get("uri") == uri and _alive(mlflow, known.get("run_id")):
        return known
    exp_id = experiment_id(mlflow, MLFLOW_EXPERIMENT)
    run = retried(lambda: mlflow.create_run(exp_id, run_name=recipe.name,
                                            tags={"foldwise.experiment": recipe.name, "foldwise.kind": "experiment",
                                                  "foldwise.run_dir": str(exp_dir.resolve())}))
    from kfold.track import recipe_params

    log_params(mlflow, run.info.run_id, recipe_params(recipe))
    record["mlflow"] = {"uri": uri, "experiment_id": exp_id, "run_id": run.info.run_id}
    write_json(exp_dir / RECORD, record)
    return record["mlflow"]


class MlflowRun:
    """One MLflow run written to by a fold or a blend.

    A row's metrics are written by one background thread, in order: a SQLite commit (and its retries while
    another fold job holds the database) would otherwise stall training (``bench/bench_trackers.py``). A write
    that failed surfaces at the next row or at the end.
    """

    name = "mlflow"

    def __init__(self, mlflow: Any, uri: str, experiment_id: str, run_id: str) -> None:
        self.mlflow, self.uri, self.experiment_id, self.run_id = mlflow, uri, experiment_id, run_id
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mlflow-log")
        self._pending: list[Future] = []

    def _check_written(self, wait: bool = False) -> None:
        """Raise the first failed write; drop the writes that are done (all of them, waiting, when ``wait``)."""
        if wait:
            futures.wait(self._pending)
        for future in [f for f in self._pending if f.done()]:
            self._pending.remove(future)
            future.result()

    @classmethod
    def child(cls, parent: Mapping[str, str], run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              recorded: Mapping[str, str] | None) -> MlflowRun:
        """A fold's run under ``parent``: the one ``recorded`` (a resumed fold) when it is still there."""
        mlflow = client(parent["uri"])
        if recorded and recorded.get("uri") == parent["uri"] and _alive(mlflow, recorded.get("run_id")):
            retried(lambda: mlflow.update_run(recorded["run_id"], status="RUNNING"))
            return cls(mlflow, parent["uri"], parent["experiment_id"], recorded["run_id"])
        run = retried(lambda: mlflow.create_run(parent["experiment_id"], run_name=run_name,
                                                tags={"mlflow.parentRunId": parent["run_id"], **tags}))
        log_params(mlflow, run.info.run_id, params)
        return cls(mlflow, parent["uri"], parent["experiment_id"], run.info.run_id)

    @classmethod
    def new(cls, uri: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> MlflowRun:
        """A run of its own (a blend's), in the ``foldwise`` MLflow experiment."""
        from kfold.track import MLFLOW_EXPERIMENT

        mlflow = client(uri)
        exp_id = experiment_id(mlflow, MLFLOW_EXPERIMENT)
        run = retried(lambda: mlflow.create_run(exp_id, run_name=run_name, tags=dict(tags)))
        log_params(mlflow, run.info.run_id, params)
        return cls(mlflow, uri, exp_id, run.info.run_id)

    def record(self) -> dict[str, str]:
        return {"uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def _write(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        retried(lambda: self.mlflow.log_batch(self.run_id, metrics=batch))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._check_written()
        self._pending.append(self._writer.submit(self._write, dict(metrics), step))

    def finish(self, summary: Mapping[str, float], files: Mapping[str, str], ok: bool) -> None:
        try:
            self._check_written(wait=True)
        finally:
            self._writer.shutdown(wait=True)
        if summary:
            self._write(summary, 0)
        for name, ref in files.items():
            retried(lambda n=name, r=ref: self.mlflow.set_tag(self.run_id, f"foldwise.file.{n}", r))
        retried(lambda: self.mlflow.set_terminated(self.run_id, "FINISHED" if ok else "FAILED"))


def finish_parent(parent: Mapping[str, str] | None, scores: Mapping[str, Any]) -> None:
    """The experiment's pooled OOF scores on its parent run, which then ends."""
    if not parent:
        return
    run = MlflowRun(client(parent["uri"]), parent["uri"], parent["experiment_id"], parent["run_id"])
    run.finish({k: float(v) for k, v in scores.items()}, {}, ok=True)
