"""Each fold's metrics mirrored where competitors already look: TensorBoard, MLflow and Weights & Biases.

``metrics.csv`` stays the record of truth; a tracker is a mirror. One that fails (a missing package, an
unwritable folder, an unreachable server) prints one warning line naming it and is off for the rest of that
process: training never stops for a tracker. Where each writes (docs/tracking.md):

- tensorboard: ``runs/<experiment>/tb/fold<k>/`` (scalars at each ``metrics.csv`` row's step, the recipe and
  the fold's final metrics as hparams); a blend: ``runs/blends/<name>/tb/``.
- mlflow: ``train.mlflow_uri`` (default ``sqlite:///<runs>/mlflow.db``), MLflow experiment ``foldwise``: one
  parent run per experiment (made before any fold job starts), one child run per fold, one run per blend.
- wandb: offline under ``runs/<experiment>/wandb/`` unless ``WANDB_MODE`` says otherwise; group = experiment,
  job type = ``fold<k>``.

The runs' ids are kept in ``trackers.json`` (per experiment and per fold): a resumed fold continues its runs,
and the leaderboard's ``trackers`` column leads from a row to its curves.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from foldwise.io import read_text, sha256_file, write_json
from kfold.config import Recipe, Tracker, to_dict
from kfold.rundir import flatten_recipe

TRACKERS: tuple[str, ...] = typing.get_args(Tracker)  # the names train.track takes
RECORD = "trackers.json"
MLFLOW_EXPERIMENT = "foldwise"
POSITION_KEYS = ("epoch", "iteration")  # a metrics.csv row's step, not a metric


def metric_tag(column: str) -> str:
    """The tracker name of a ``metrics.csv`` column: ``train_total`` -> ``train/total``, ``val_miou`` ->
    ``val/miou``, ``iou_bed`` -> ``val_iou/bed``, ``images_per_s`` -> ``speed/images_per_s``."""
    for prefix, group in (("train_", "train/"), ("iou_", "val_iou/"), ("val_", "val/")):
        if column.startswith(prefix):
            return group + column.removeprefix(prefix)
    return "speed/images_per_s" if column == "images_per_s" else column


def row_metrics(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, ``{tag: value}``) of one ``metrics.csv`` row: the iteration of an iteration run, else the epoch."""
    step = int(row["iteration"] if "iteration" in row else row["epoch"])
    metrics = {metric_tag(k): float(v) for k, v in row.items()
               if k not in POSITION_KEYS and isinstance(v, int | float) and not isinstance(v, bool)}
    return step, metrics


def default_mlflow_uri(runs_dir: str | Path) -> str:
    """``sqlite:///<runs>/mlflow.db`` with an absolute path, so fold jobs in other folders find the same file."""
    return f"sqlite:///{(Path(runs_dir).resolve() / 'mlflow.db').as_posix()}"


def read_record(path: Path) -> dict[str, Any]:
    """A ``trackers.json`` (empty when missing or unreadable: the ids are a convenience, never a reason to stop)."""
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tracker_links(record: Mapping[str, Any]) -> str:
    """The leaderboard's ``trackers`` cell: ``mlflow:<run id> wandb:<group> tensorboard:<folder>``."""
    parts = []
    if "mlflow" in record:
        parts.append(f"mlflow:{record['mlflow'].get('run_id', '')}")
    if "wandb" in record:
        parts.append(f"wandb:{record['wandb'].get('group', record['wandb'].get('run_id', ''))}")
    if "tensorboard" in record:
        parts.append(f"tensorboard:{record['tensorboard'].get('logdir', '')}")
    return " ".join(parts)


def check_folder(folder: Path) -> Path:
    """Make ``folder`` (and its parents) unless it, or the nearest folder above it that exists, is not writable: by
    the process, or, for root, whom permissions do not stop, by anyone (a folder the user made read-only is meant
    to be left alone, and root could otherwise create inside it)."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not os.access(existing, os.W_OK) or not existing.stat().st_mode & 0o222:
        raise PermissionError(f"{existing}: not writable")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process at a time makes an experiment's parent runs (fold jobs may start together)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".trackers.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


_FAILED: set[str] = set()  # trackers that failed in this process: off for the rest of it, warned about once


def warn(name: str, err: BaseException) -> None:
    """The one line a failing tracker gets; it is off for the rest of this process."""
    _FAILED.add(name)
    what = " ".join(str(err).split()) or "failed"
    print(f"warning: tracker {name}: {type(err).__name__}: {what}; {name} is off, training goes on "
          f"(metrics.csv is the record)", file=sys.stderr, flush=True)


class Tracking:
    """The trackers of one run (a fold or a blend): every call fans out to each, and a tracker that raises is
    warned about once and dropped.

    Args:
        openers: tracker name -> a call that starts its run (a backend with ``log``, ``finish``, ``record``).
        record_path: the ``trackers.json`` the backends' ids are written to (None: not kept).
    """

    def __init__(self, openers: Mapping[str, Callable[[], Any]], record_path: Path | None = None) -> None:
        self.backends: dict[str, Any] = {}
        self.record_path = record_path
        for name, opener in openers.items():
            if name in _FAILED:
                continue
            backend = self._guard(name, opener)
            if backend is not None:
                self.backends[name] = backend
        self._keep_record()

    def _guard(self, name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - a mirror's failure of any kind must not stop training
            if name not in _FAILED:
                warn(name, err)
            self.backends.pop(name, None)
            return None

    def _keep_record(self) -> None:
        if self.record_path is None or not self.backends:
            return
        record = read_record(self.record_path)
        for name, backend in list(self.backends.items()):
            ids = self._guard(name, backend.record)
            if ids is not None:
                record[name] = ids
        self._guard(RECORD, lambda: write_json(self.record_path, record))

    def log_row(self, row: Mapping[str, Any]) -> None:
        """Mirror one ``metrics.csv`` row."""
        step, metrics = row_metrics(row)
        for name, backend in list(self.backends.items()):
            self._guard(name, lambda b=backend: b.log(metrics, step))

    def finish(self, summary: Mapping[str, float], files: Mapping[str, Path] | None = None, ok: bool = True) -> None:
        """End every run: the final metrics, the files by reference (path and sha256), finished or failed."""
        summary = {k: float(v) for k, v in summary.items() if v is not None and not math.isnan(float(v))}
        refs = {}
        if ok and files and "mlflow" in self.backends:  # only MLflow keeps references; sha256 of large stores costs
            refs = {name: f"{Path(path).resolve()} sha256:{sha256_file(path)}" for name, path in files.items()
                    if Path(path).is_file()}
        for name, backend in list(self.backends.items()):
            self._guard(name, lambda b=backend: b.finish(summary, refs, ok))
        self.backends.clear()

    @property
    def names(self) -> list[str]:
        return list(self.backends)


def final_summary(result: Mapping[str, Any]) -> dict[str, float]:
    """A fold's final metrics for the trackers, from ``predict_fold``'s result."""
    out = {"final/oof_miou": result["oof_miou"], "final/oof_pixel_acc": result["oof_pixel_acc"],
           **{f"final/oof_iou/{c}": v for c, v in result["oof_per_class_iou"].items()}}
    test = result.get("test")
    if test:
        out.update({"final/test_miou": test["oof_miou"], "final/test_pixel_acc": test["oof_pixel_acc"]})
    return out


def recipe_params(recipe: Recipe) -> dict[str, Any]:
    """The flattened recipe as tracker params: ``{"optim.lr": 0.0001, "tta.scales": "[0.5, 1.0]", ...}``."""
    return {k: v if isinstance(v, int | float | str | bool) or v is None else json.dumps(v)
            for k, v in flatten_recipe(to_dict(recipe)).items()}


def prepare_experiment(recipe: Recipe, runs_dir: str | Path) -> None:
    """Before any fold job starts: the MLflow database made and migrated, and the experiment's parent run, so
    parallel fold jobs never race to create them. Other trackers need nothing up front."""
    if "mlflow" not in recipe.train.track:
        return
    from kfold.track.mlflow_run import parent_run

    exp_dir = Path(runs_dir) / recipe.name
    try:
        with _locked(exp_dir):
            parent_run(recipe, exp_dir, _mlflow_uri(recipe, runs_dir))
    except Exception as err:  # noqa: BLE001 - the fold jobs will warn again; training still goes on
        warn("mlflow", err)


def _mlflow_uri(recipe: Recipe, runs_dir: str | Path) -> str:
    return recipe.train.mlflow_uri or default_mlflow_uri(runs_dir)


def _openers(trackers: Sequence[str], params: Mapping[str, Any], tb_dir: Path, wandb: Mapping[str, Any],
             mlflow: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
    """One call per tracker that starts its run: TensorBoard in ``tb_dir``, W&B with ``wandb``'s folder and names,
    MLflow by ``mlflow``; each imports its package only when called."""

    def tensorboard() -> Any:
        from kfold.track.tensorboard_run import TensorBoardRun

        return TensorBoardRun(tb_dir, params)

    def wandb_run() -> Any:
        from kfold.track.wandb_run import WandbRun

        return WandbRun(config=params, **wandb)

    made = {"tensorboard": tensorboard, "mlflow": mlflow, "wandb": wandb_run}
    return {name: made[name] for name in trackers}


def open_fold(recipe: Recipe, runs_dir: str | Path, fold: int) -> Tracking:
    """The trackers of one fold (``train.track``), continuing the runs its ``trackers.json`` names."""
    exp_dir = Path(runs_dir) / recipe.name
    run_dir = exp_dir / f"fold{fold}"
    recorded, params = read_record(run_dir / RECORD), recipe_params(recipe)

    def mlflow() -> Any:
        from kfold.track.mlflow_run import MlflowRun, parent_run

        with _locked(exp_dir):
            parent = parent_run(recipe, exp_dir, _mlflow_uri(recipe, runs_dir))
        return MlflowRun.child(parent, f"{recipe.name}/fold{fold}", params,
                               {"foldwise.experiment": recipe.name, "foldwise.fold": str(fold),
                                "foldwise.run_dir": str(run_dir.resolve())}, recorded.get("mlflow"))

    wandb = {"folder": exp_dir, "group": recipe.name, "job_type": f"fold{fold}", "name": f"{recipe.name}/fold{fold}",
             "recorded": recorded.get("wandb")}
    return Tracking(_openers(recipe.train.track, params, exp_dir / "tb" / f"fold{fold}", wandb, mlflow),
                    run_dir / RECORD)


def track_blend(name: str, trackers: Sequence[str], runs_dir: str | Path, mlflow_uri: str | None,
                params: Mapping[str, Any], summary: Mapping[str, float]) -> str:
    """Log a finished blend as one run of each tracker (params: members, weights, temperatures; the summary:
    in-sample, nested and test scores); returns the leaderboard's ``trackers`` cell."""
    folder = Path(runs_dir) / "blends" / name

    def mlflow() -> Any:
        from kfold.track.mlflow_run import MlflowRun

        return MlflowRun.new(mlflow_uri or default_mlflow_uri(runs_dir), name, params,
                             {"foldwise.kind": "blend", "foldwise.blend": name})

    wandb = {"folder": folder, "group": name, "job_type": "blend", "name": name}
    tracking = Tracking(_openers(trackers, params, folder / "tb", wandb, mlflow), folder / RECORD)
    tracking.finish(summary)
    return tracker_links(read_record(folder / RECORD))


def finish_experiment(recipe: Recipe, runs_dir: str | Path, scores: Mapping[str, Any]) -> None:
    """Every fold is complete: the parent MLflow run gets the pooled OOF scores and is ended."""
    if "mlflow" not in recipe.train.track:
        return
    exp_dir = Path(runs_dir) / recipe.name
    try:
        from kfold.track.mlflow_run import finish_parent

        finish_parent(read_record(exp_dir / RECORD).get("mlflow"), scores)
    except Exception as err:  # noqa: BLE001 - the report is written either way
        warn("mlflow", err)


def experiment_links(exp_dir: Path) -> str:
    """The leaderboard cell of an experiment: its MLflow parent run, W&B group and TensorBoard folder."""
    record = dict(read_record(exp_dir / RECORD))
    folds = [read_record(p) for p in sorted(exp_dir.glob("fold*/" + RECORD))]
    if any("wandb" in f for f in folds):
        record["wandb"] = {"group": exp_dir.name}
    if any("tensorboard" in f for f in folds):
        record["tensorboard"] = {"logdir": str(exp_dir / "tb")}
    return tracker_links(record)


def wandb_sync_hint(exp_dir: Path) -> str | None:
    """The ``wandb sync`` line for an experiment's offline fold runs (None when it has none)."""
    dirs = [r["wandb"]["dir"] for p in sorted(Path(exp_dir).glob("fold*/" + RECORD))
            if (r := read_record(p)).get("wandb", {}).get("mode") == "offline" and r["wandb"].get("dir")]
    if not dirs:
        return None
    return f"wandb: {len(dirs)} offline run(s) of {Path(exp_dir).name}; upload them with: wandb sync {' '.join(dirs)}"
