"""The run folder of one experiment and fold (``runs/<experiment>/fold<k>/``): its record, its state, its writer.

``config.yaml`` records the resolved recipe a fold was trained with; :func:`recipe_differences` compares it
with the recipe of a new launch so that a finished fold is never silently reused under another recipe.
Torch-free: the launcher and ``kfold.status`` read run folders without the training stack.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from foldwise.io import read_text, write_text
from kfold.config import Recipe, to_dict
from kfold.store.format import MANIFEST

CONFIG = "config.yaml"
# Keys that cannot change what a fold learns or predicts: where and how fast the data is read, how many
# images go through the model at once. A finished fold launched again with other values is still reused.
RESULT_NEUTRAL_KEYS = ("name", "data.root", "data.shards", "data.num_workers", "oof.batch_size", "tta.max_batch",
                       "oof.keep_fold_test", "train.track", "train.mlflow_uri")
# A stream deals its shards to the loader workers: there the worker count changes the batches.
STREAMING_RESULT_KEYS = ("data.num_workers",)


def fold_dir(out: str | Path, experiment: str, fold: int) -> Path:
    """``<out>/<experiment>/fold<fold>``."""
    return Path(out) / experiment / f"fold{fold}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def write_config(run_dir: Path, recipe: Recipe, data_root: Path, fold: int, folds_sha256: str,
                 opts: dict[str, Any] | None = None) -> None:
    """``config.yaml``: the resolved recipe plus what is needed to trust and repeat the run; ``opts`` are the
    ``--opts`` overrides of the experiment's recipe (a search trial's parameters among them)."""
    packages = ["torch", "segmentation-models-pytorch", "timm", "albumentations", "numpy"]
    info = {"experiment": recipe.name, "fold": fold, "data_root": str(Path(data_root).resolve()),
            "folds_sha256": folds_sha256, "git_commit": git_commit(), "command": sys.argv,
            "opts": dict(opts or {}), "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), **{p: _version(p) for p in packages}},
            "recipe": to_dict(recipe)}
    write_text(run_dir / CONFIG, yaml.safe_dump(info, sort_keys=False))


def flatten_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1e-4, ...}``: one entry per recipe key; mapping values (class weights, key maps) whole."""
    return {f"{section}.{key}" if isinstance(fields, dict) else section: value
            for section, fields in recipe.items()
            for key, value in (fields.items() if isinstance(fields, dict) else [(None, fields)])}


def recipe_differences(run_dir: Path, recipe: Recipe, data_root: Path | None = None,
                       folds_sha256: str | None = None) -> list[str]:
    """Keys whose value in the fold's ``config.yaml`` differs from ``recipe`` (result-neutral keys skipped).

    Args:
        run_dir: the fold's folder.
        recipe: the recipe of the new launch.
        data_root: compared with the recorded root when given (``data root`` is reported).
        folds_sha256: compared with the recorded ``folds.csv`` digest when given (``folds.csv``).

    Returns:
        Sorted dotted keys; ``["config.yaml"]`` when the record is missing or unreadable.
    """
    try:
        record = yaml.safe_load(read_text(run_dir / CONFIG))
        old = flatten_recipe(record["recipe"])
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return [CONFIG]
    new = flatten_recipe(to_dict(recipe))
    # A key added after the fold was recorded is absent from its record: the fold ran with that key's default.
    old = {**flatten_recipe(to_dict(Recipe())), **old}
    neutral = set(RESULT_NEUTRAL_KEYS) - (set(STREAMING_RESULT_KEYS) if recipe.data.streaming else set())
    keys = sorted(k for k in set(old) | set(new) if k not in neutral and old.get(k) != new.get(k))
    if data_root is not None and record.get("data_root") != str(Path(data_root).resolve()):
        keys.append("data root")
    if folds_sha256 is not None and record.get("folds_sha256") != folds_sha256:
        keys.append("folds.csv")
    return keys


def describe_difference(run_dir: Path, recipe: Recipe, keys: list[str]) -> str:
    """``optim.lr 0.0001 -> 0.0003`` for the first few differing keys."""
    try:
        old = flatten_recipe(yaml.safe_load(read_text(run_dir / CONFIG))["recipe"])
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        old = {}
    new = flatten_recipe(to_dict(recipe))
    parts = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" if k in new else k for k in keys[:4]]
    return ", ".join(parts) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def clear_fold(run_dir: Path) -> None:
    """Remove a fold's results for ``--retrain``: the manifest first, so nothing looks complete meanwhile."""
    (run_dir / MANIFEST).unlink(missing_ok=True)
    if run_dir.is_dir():
        shutil.rmtree(run_dir)


JOB = "job.json"
# A job's states in the order it moves through them; a record never goes back (a late "pending" from the
# launcher must not hide the "running" its job already wrote).
JOB_STATES = ("pending", "requeued", "running", "cancelled", "completed", "failed")


def read_job_record(run_dir: Path) -> dict[str, Any]:
    """The fold's ``job.json`` (empty when there is none or it is unreadable)."""
    try:
        record = json.loads((Path(run_dir) / JOB).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def update_job_record(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the fold's ``job.json`` under a lock (the launcher and its job both write it).

    A record of another job id is replaced; within one job the state only moves forward, except that a
    requeue or a new start of the same job may follow a running state.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".job.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = read_job_record(run_dir)
        if "job_id" in fields and record.get("job_id") not in (None, fields["job_id"]):
            record = {}
        old, new = record.get("state"), fields.get("state")
        if new == "pending" and old in JOB_STATES and old != "pending":
            fields = {k: v for k, v in fields.items() if k != "state"}
        record.update(fields)
        write_text(run_dir / JOB, json.dumps(record, indent=2) + "\n")
    return record


LOCK = ".fold.lock"


class FoldBusy(OSError):
    """Another process is writing the fold; the message names it."""


class FoldLock:
    """The one writer of a fold folder: an exclusive lock on ``<fold>/.fold.lock``, taken before the first write
    and held to the end, with its holder (host, pid, job id, start time) written inside.

    A POSIX record lock (``lockf``): the kernel releases it when its process dies, and unlike ``flock`` it is
    not shared with forked children (DataLoader workers), so the lock of a killed run is free at once; the
    next holder says whose lock it took over. A second launch of a fold that is being written is refused
    naming the holder, or waits for it (``wait``). The lock file is opened once per holder: closing any other
    descriptor of it in the same process would drop a POSIX lock.

    Args:
        run_dir: the fold folder (created when missing).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._file: Any = None

    @staticmethod
    def describe(record: str) -> str:
        """Who a lock file's text says holds (or last held) the lock."""
        try:
            data = json.loads(record)
            return f"pid {data['pid']} on {data['host']} (job {data['job_id']}), since {data['started']}"
        except (ValueError, KeyError, TypeError):
            return "another process"

    def _busy(self, file: Any) -> FoldBusy:
        file.seek(0)
        return FoldBusy(f"{self.run_dir}: being written by {self.describe(file.read())}; wait for it to finish, "
                        "or launch again with --wait")

    def acquire(self, wait: bool = False, log: Any = print) -> FoldLock:
        """Take the lock; raise FoldBusy naming the holder when it is held and ``wait`` is False."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 - held open as long as the lock
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # no locks on this file system: run, and say so
                log(f"{self.run_dir}: no lock on this file system ({err.strerror}); one writer per fold is "
                    "not enforced")
            elif not wait:
                busy = self._busy(file)
                file.close()
                raise busy from None
            else:
                log(str(self._busy(file)).replace("being written by", "waiting for", 1).split("; wait")[0])
                fcntl.lockf(file, fcntl.LOCK_EX)
        file.seek(0)
        previous = file.read().strip()
        if previous:
            log(f"{self.run_dir}: took over the lock of {self.describe(previous)} (that process is gone)")
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "-"
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": platform.node(), "pid": os.getpid(), "job_id": job_id,
                               "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        """Empty the record and let go (the file stays: removing it would race with a waiting process)."""
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
            fcntl.lockf(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def probe(self) -> None:
        """Raise FoldBusy when the fold is being written now; take nothing (the launcher checks before jobs).

        Call it only where this process does not hold the fold's lock (closing the probe's descriptor would
        drop it)."""
        if not self.path.is_file():
            return
        with open(self.path, "a+") as file:
            try:
                fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EACCES, errno.EAGAIN):
                    raise self._busy(file) from None
                return
            fcntl.lockf(file, fcntl.LOCK_UN)

    def __enter__(self) -> FoldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
