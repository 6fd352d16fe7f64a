"""One trial of a search: a sampled recipe trained as an ordinary experiment, fold by fold, pruned early.

The trial is the experiment ``<study>/<folder>`` (``runs/<study>/t007/fold<k>/``): its folds run through the
same launcher as an experiment script, on the same ``folds.csv`` and with the same seeds as every other trial
(paired folds), and its parameters are its ``--opts``, so the fold's ``config.yaml`` records them in its
command line beside the resolved recipe. Each finished fold's OOF mIoU is reported at step = fold; when the
pruner stops the trial, its unfinished fold jobs are cancelled and its finished folds are kept.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldwise.io import read_json_object
from kfold.config import ConfigError, Recipe
from kfold.rundir import fold_dir, recipe_differences
from kfold.search.space import Dimension, apply
from kfold.search.study import Heartbeat, claim
from kfold.store.format import MANIFEST, is_complete


class TrialFailed(RuntimeError):
    """A fold job of a trial failed: the search stops rather than spend its budget on a broken setup."""


@dataclass
class SearchSetup:
    """What every trial of one search shares.

    Args:
        study: the study's name (its runs folder ``<out>/<study>/``).
        experiment / base: the experiment searched and its recipe differences (``RECIPE`` of its script).
        recipe: the resolved recipe every trial starts from (preset, data root, fixed ``--opts``).
        space: the searched keys.
        argv: the trial command line before its parameters (preset, data root, out, launcher flags, fixed opts).
        root_path / folds_sha256: the data root and its folds, for the reuse check of a retried trial's folds.
    """

    study: str
    experiment: str
    base: dict[str, Any]
    recipe: Recipe
    space: list[Dimension]
    argv: list[str]
    out: str
    root_path: Path
    folds_sha256: str
    k: int = field(init=False)

    def __post_init__(self) -> None:
        self.k = self.recipe.data.k_folds


def opts_text(value: Any) -> str:
    """A parameter as ``--opts`` text that ``kfold.config.parse_value`` reads back to the same value."""
    return value if isinstance(value, str) else json.dumps(value)


def fold_score(out: str, name: str, fold: int) -> float:
    """A finished fold's OOF mIoU at full label resolution (its manifest's record)."""
    return float(read_json_object(fold_dir(out, name, fold) / MANIFEST)["oof_miou"])


def run_trial(study: Any, trial: Any, setup: SearchSetup) -> str:
    """Sample, train and report one trial; tell the study how it ended. Returns the state's name.

    Raises:
        TrialFailed: a fold job failed (the trial is marked failed first).
    """
    from optuna.trial import TrialState

    params = {dim.key: dim.sample(trial) for dim in setup.space}
    folder = trial.user_attrs.get("folder") or f"t{trial.number:03d}"  # a retry keeps its run folder
    claim(study, trial, folder)
    name = f"{setup.study}/{folder}"
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    try:
        recipe = apply(setup.recipe, params)
    except ConfigError as err:  # the space's ends are valid, but this combination is not
        trial.set_user_attr("error", str(err))
        study.tell(trial, state=TrialState.FAIL)
        print(f"{setup.study}: trial {trial.number} ({shown}): not a valid recipe ({err}); skipped")
        return "FAIL"
    recipe.name = name
    print(f"{setup.study}: trial {trial.number} -> {Path(setup.out) / name} ({shown})", flush=True)
    scores: dict[int, float] = {}
    todo = []
    for fold in range(setup.k):  # folds a killed attempt finished are reported, not trained again
        run_dir = fold_dir(setup.out, name, fold)
        if is_complete(run_dir) and not recipe_differences(run_dir, recipe, setup.root_path, setup.folds_sha256):
            scores[fold] = fold_score(setup.out, name, fold)
        else:
            todo.append(fold)
    pruned_at: list[int] = []
    failed: list[int] = []

    def report(fold: int, ok: bool) -> bool:
        if not ok:
            failed.append(fold)
            return False
        scores[fold] = fold_score(setup.out, name, fold)
        trial.report(scores[fold], fold)
        print(f"{setup.study}: trial {trial.number} fold {fold}: OOF mIoU {scores[fold]:.4f}", flush=True)
        if len(scores) < setup.k and trial.should_prune():
            pruned_at.append(fold)
            return False
        return True

    for fold in sorted(scores):
        if not report(fold, True):
            break
    if not pruned_at and todo:
        from kfold.cli import parse_args
        from kfold.launch import run_folds

        argv = [*setup.argv, *[text for k, v in params.items() for text in (k, opts_text(v))]]
        with Heartbeat(study, trial._trial_id):
            run_folds(name, setup.base, parse_args(argv), todo, argv, report)
    if failed:
        trial.set_user_attr("error", f"fold {failed[0]} failed")
        study.tell(trial, state=TrialState.FAIL)
        raise TrialFailed(f"trial {trial.number} ({name}): fold {failed[0]} failed; see python -m kfold.status "
                          f"--out {setup.out} {name}")
    if pruned_at:
        trial.set_user_attr("pruned_at", pruned_at[0])
        study.tell(trial, state=TrialState.PRUNED)
        print(f"{setup.study}: trial {trial.number} pruned after {len(scores)} fold(s); its other fold jobs were "
              f"cancelled, its finished folds kept", flush=True)
        return "PRUNED"
    study.tell(trial, statistics.fmean(scores[f] for f in range(setup.k)))
    return "COMPLETE"

