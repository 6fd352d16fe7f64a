"""What a search found, and how much of it is selection: the trials table, ``study.csv``, plots, the record.

The best of many recipes scored on the same folds is optimistic: its mean includes the luck of being picked.
The selection-corrected estimate (Tibshirani & Tibshirani 2009) takes, on each fold, how far the best trial on
that fold is above the chosen trial, and subtracts the mean of that gap from the chosen trial's mean. It
corrects for the choice among these trials on these folds; it does not cover earlier searches, hand-picked
spaces or the gap between the folds and the hidden test set.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foldwise.figures import save_figure
from foldwise.io import read_json_object, write_json, write_text

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


@dataclass
class Selection:
    """The best complete trial and its selection-corrected score."""

    best: Any  # FrozenTrial
    mean: float
    corrected: float
    bias: float
    n_trials: int  # trials with at least one fold score: what the correction is taken over
    spread_sd: float
    low: float
    high: float


def selection_corrected(trials: Sequence[Any], k: int) -> Selection | None:
    """Tibshirani & Tibshirani's estimate over ``trials`` (fold scores = intermediate values at step = fold);
    None without a complete trial."""
    complete = [t for t in trials if t.state.name == "COMPLETE" and len(t.intermediate_values) == k]
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value)
    scored = [t for t in trials if t.intermediate_values]
    gaps = [max(t.intermediate_values[f] for t in scored if f in t.intermediate_values) - best.intermediate_values[f]
            for f in range(k)]
    bias = statistics.fmean(gaps)
    means = [t.value for t in complete]
    return Selection(best, best.value, best.value - bias, bias, len(scored),
                     statistics.stdev(means) if len(means) > 1 else 0.0, min(means), max(means))


def rows(trials: Sequence[Any], k: int) -> list[dict[str, Any]]:
    """One row per trial: number, folder, state, fold scores, mean, pruned at, params."""
    out = []
    for t in trials:
        folds = {f"fold{f}": t.intermediate_values.get(f) for f in range(k)}
        out.append({"trial": t.number, "folder": t.user_attrs.get("folder", ""),
                    "state": STATES.get(t.state.name, t.state.name.lower()), **folds,
                    "mean": t.value if t.state.name == "COMPLETE" else None,
                    "pruned_at": t.user_attrs.get("pruned_at"), "retry_of": t.system_attrs.get("failed_trial"),
                    **{f"param {k2}": v for k2, v in t.params.items()}})
    return out


def table(trial_rows: list[dict[str, Any]], k: int) -> str:
    head = f"{'trial':>5}  {'folder':<6}  {'state':<8}" + "".join(f"{'fold' + str(f):>8}" for f in range(k))
    lines = [head + f"{'mean':>8}  pruned  params"]
    for r in trial_rows:
        cells = "".join(f"{r[f'fold{f}']:>8.4f}" if r[f"fold{f}"] is not None else f"{'':>8}" for f in range(k))
        mean = f"{r['mean']:>8.4f}" if r["mean"] is not None else f"{'':>8}"
        pruned = f"fold {r['pruned_at']}" if r["pruned_at"] is not None else ""
        params = " ".join(f"{key[6:]}={_short(v)}" for key, v in r.items() if key.startswith("param "))
        lines.append(f"{r['trial']:>5}  {r['folder']:<6}  {r['state']:<8}{cells}{mean}  {pruned:<6}  {params}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def study_csv(trial_rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for r in trial_rows for key in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in trial_rows)
    return buf.getvalue()


def summary(selection: Selection | None, k: int) -> list[str]:
    if selection is None:
        return ["no trial finished all its folds yet: no best trial, no corrected estimate"]
    s = selection
    folder = s.best.user_attrs.get("folder", f"t{s.best.number:03d}")
    return [f"best trial {s.best.number} ({folder}): mean OOF mIoU {s.mean:.4f} over {k} folds",
            f"selection-corrected estimate {s.corrected:.4f} (Tibshirani & Tibshirani 2009: minus {s.bias:.4f}, the "
            f"mean gap on each fold between the best of {s.n_trials} trials and the chosen one)",
            f"complete trials' means: sd {s.spread_sd:.4f}, from {s.low:.4f} to {s.high:.4f}"]


def plot(study: Any, folder: Path) -> list[Path]:
    """Optuna's optimisation history and score against each parameter (matplotlib backends)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as views

    made = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib views experimental
        for name, view in (("history", views.plot_optimization_history), ("params", views.plot_slice)):
            ax = view(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            save_figure(figure, folder / f"{name}.png")
            made.append(folder / f"{name}.png")
    return made


def write_outputs(study: Any, study_dir: Path, out: str, k: int, storage: str) -> str:
    """Print-ready report; writes ``study.csv``, ``search.json``, ``plots/`` and the best trial's leaderboard
    row (its selection-corrected score, picked up by the leaderboard like every experiment row)."""
    trials = study.get_trials(deepcopy=False)
    trial_rows = rows(trials, k)
    selection = selected = selection_corrected(trials, k)
    write_text(study_dir / "study.csv", study_csv(trial_rows))
    plots = plot(study, study_dir / "plots") if selection is not None else []
    record = {"study": study.study_name, "storage": storage, "folds": k,
              "trials": {s: sum(r["state"] == s for r in trial_rows) for s in STATES.values()}}
    if selected is not None:
        best_name = f"{study.study_name}/{selected.best.user_attrs.get('folder')}"
        record.update({"best_trial": selected.best.number, "best": best_name, "mean": selected.mean,
                       "selection_corrected": selected.corrected, "bias": selected.bias,
                       "n_trials_corrected_for": selected.n_trials, "spread_sd": selected.spread_sd,
                       "params": selected.best.params})
        _mark_leaderboard_row(Path(out) / best_name, selected)
    write_json(study_dir / "search.json", record)
    lines = [table(trial_rows, k), "", *summary(selection, k), "",
             f"wrote {study_dir / 'study.csv'}, {study_dir / 'search.json'}"
             + (", " + ", ".join(str(p) for p in plots) if plots else ""),
             f"leaderboard: each complete trial left its row in {Path(out) / study.study_name}/tNNN/; "
             f"foldwise leaderboard (or a blend) adds them to submissions/leaderboard.csv",
             f"dashboard: optuna-dashboard {storage.removeprefix('journal:')}"]
    return "\n".join(lines)


def _mark_leaderboard_row(exp_dir: Path, selection: Selection) -> None:
    """The best trial's row (its report wrote it) carries the selection-corrected score on the row's own basis:
    its pooled OOF mIoU less the same bias, so the two columns of the row compare."""
    path = exp_dir / "leaderboard_row.json"
    if not path.is_file():
        return
    row = read_json_object(path)
    pooled = row.get("oof_miou")
    row["oof_miou_selected"] = None if pooled is None or math.isnan(selection.bias) else pooled - selection.bias
    row["notes"] = (f"best of {selection.n_trials} trials of study {exp_dir.parent.name}; oof_miou_selected is "
                    f"selection-corrected")
    write_json(path, row)
