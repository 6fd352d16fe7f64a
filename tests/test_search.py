"""``python -m kfold.search`` as a user runs it: a small study read back with Optuna's own ``load_study``, its best
trials blended and on the leaderboard, a search killed and continued, and spaces refused before any training. A
root of its own with 3 folds keeps it short. (Workers and SLURM: tests/test_search_workers.py.)"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e  # searches train real (smoke) folds in subprocesses

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SPACE = "optim.lr: {float: [1.0e-4, 1.0e-2], log: true}\nloss.depth_weight: {float: [0.0, 0.5]}\n"


def search(root: Path, out: Path, space: Path, *extra: str, folds: int = 3, timeout: float = 300
           ) -> subprocess.CompletedProcess:
    return subprocess.run(command(root, out, space, *extra, folds=folds), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def command(root: Path, out: Path, space: Path, *extra: str, folds: int = 3) -> list[str]:
    return [sys.executable, "-m", "kfold.search", "exp093_2", "--space", str(space), "--preset", "smoke",
            "--data-root", str(root), "--out", str(out), *extra, "--opts", "data.k_folds", str(folds),
            "schedule.epochs", "1"]


def load(out: Path, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{out / study / 'study.db'}")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from kfold.data.synthetic import generate

    out = tmp_path_factory.mktemp("search_root") / "root"
    generate(out, n_train=24, n_test=4, size=(48, 64), seed=1, progress=False)
    return out


def make_space(folder: Path) -> Path:
    path = folder / "space.yaml"
    path.write_text(SPACE)
    return path


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    return make_space(tmp_path_factory.mktemp("space"))


@pytest.fixture(scope="module")
def study(root, space, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("search") / "runs"
    proc = search(root, out, space, "--trials", "3", "--pruner", "median", "--study", "s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_a_study_of_k_fold_trials_with_a_selection_corrected_score(study) -> None:
    out, proc = study
    trials = load(out, "s").get_trials()
    assert len(trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    for t in trials:  # fold scores at step = fold, from fold 0 on; a pruned trial has fewer
        steps = sorted(t.intermediate_values)
        assert steps == list(range(len(steps))) and (len(steps) == 3) == (t.state.name == "COMPLETE")
        folder = out / "s" / t.user_attrs["folder"]
        assert sorted(p.name for p in folder.glob("fold*") if (p / "manifest.json").is_file()) == \
            [f"fold{f}" for f in steps]  # a pruned trial keeps its finished folds; the others never ran
        config = yaml.safe_load((folder / "fold0" / "config.yaml").read_text())  # the trial's recipe diff
        assert config["opts"]["optim.lr"] == pytest.approx(t.params["optim.lr"]) and config["opts"]["data.k_folds"] == 3
        assert config["recipe"]["loss"]["depth_weight"] == pytest.approx(t.params["loss.depth_weight"])
    record = json.loads((out / "s" / "search.json").read_text())
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert record["best_trial"] == best.number and record["mean"] == pytest.approx(best.value)
    assert record["selection_corrected"] <= record["mean"] and record["n_trials_corrected_for"] == 3
    assert f"selection-corrected estimate {record['selection_corrected']:.4f}" in proc.stdout
    assert "dashboard: optuna-dashboard sqlite:///" in proc.stdout
    with open(out / "s" / "study.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (out / "s" / "plots" / "history.png").is_file() and (out / "s" / "plots" / "params.png").is_file()


def test_the_best_two_trials_blend_and_reach_the_leaderboard(study, tmp_path) -> None:
    out, _ = study
    complete = sorted((t for t in load(out, "s").get_trials() if t.state.name == "COMPLETE"), key=lambda t: -t.value)
    names = [f"s/{t.user_attrs['folder']}" for t in complete[:2]]
    subs = tmp_path / "subs"
    proc = subprocess.run([sys.executable, "ensemble/blend.py", "--runs-dir", str(out), "--runs", *names,
                           "--out-dir", str(subs), "--pixels", "20000", "--name", "trials", "--workers", "1"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(subs / "leaderboard.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert {"trials", *names} <= set(rows)
    assert float(rows[names[0]]["oof_miou_selected"]) <= float(rows[names[0]]["oof_miou"]) + 1e-9
    assert "best of 3 trials" in rows[names[0]]["notes"] and rows[names[1]]["oof_miou_selected"] == ""


def test_a_killed_search_continues_without_training_a_fold_twice(root, space, tmp_path) -> None:
    out = tmp_path / "runs"
    proc = subprocess.Popen(command(root, out, space, "--trials", "1", "--pruner", "none", "--study", "k"), cwd=REPO,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "k" / "t000"
    end = time.monotonic() + 240
    while not (first / "fold1" / "manifest.json").is_file():
        assert proc.poll() is None and time.monotonic() < end, "the search ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p: p.stat().st_mtime_ns for f in ("fold0", "fold1") for p in (first / f).iterdir() if p.is_file()}
    again = search(root, out, space, "--trials", "2", "--pruner", "none", "--study", "k")  # and one trial more
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "trial 0's worker is gone: failed, its parameters queued again" in again.stdout
    trials = load(out, "k").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]  # the asked number of trials: two
    assert trials[1].params == trials[0].params and trials[1].user_attrs["folder"] == "t000"
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished folds untouched
    assert sorted(trials[1].intermediate_values) == [0, 1, 2]
    assert trials[2].params != trials[0].params  # a continued study proposes a new recipe, not the first one again


@pytest.mark.parametrize("text, words", [
    ("optim.lrr: {float: [1.0e-4, 1.0e-2], log: true}\n", "unknown recipe key 'optim.lrr'; did you mean optim.lr"),
    ("optim.lr: {float: [-1.0e-4, 1.0e-2]}\n", "optim.lr: must be > 0"),
    ("optim.lr: {float: [1, 2\n", "not valid YAML"),
    ("optim.lr: {float: [1.0e-2, 1.0e-4]}\n", "low 0.01 must be below high 0.0001"),
    ("model.arch: {choice: [fpn, unet]}\n", "'unet' is not one of fpn, deeplabv3plus"),
])
def test_a_bad_space_is_one_error_line_before_any_training(root, tmp_path, text, words) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    start = time.monotonic()
    proc = search(root, tmp_path / "runs", bad, "--trials", "2", timeout=60)
    took = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {bad}") and words in lines[0]
    assert not (tmp_path / "runs").exists() and took < 5  # checked before optuna or torch is imported


def test_a_trial_command_line_keeps_the_launcher_flags_as_typed(root, space) -> None:
    from kfold.search.cli import parse_args, plan

    argv = ["exp093_2", "--space", str(space), "--trials", "2", "--data-root", str(root), "--launcher", "slurm",
            "--partition=gpu", "--slurm", "qos=high", "--track", "none", "--opts", "schedule.epochs", "1"]
    trial = plan(parse_args(argv), argv)["argv"]
    assert trial[trial.index("--launcher"):trial.index("--track")] == ["--launcher", "slurm", "--partition=gpu",
                                                                      "--slurm", "qos=high"]
    assert trial[trial.index("--track") + 1] == "none" and trial[-3:] == ["--opts", "schedule.epochs", "1"]
