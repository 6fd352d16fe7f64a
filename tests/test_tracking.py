"""Trackers as a user meets them: a tracker that fails while the fold goes on, a blend logged beside its folds and
compared with its members, bad tracker names refused. (TensorBoard, MLflow and W&B under parallel fold jobs:
tests/test_launch.py, whose launched folds are tracked.)"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kfold.track import Tracking, metric_tag, row_metrics

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("WANDB_MODE", None)


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def one_fold(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("experiments/exp093_2.py", "--preset", "smoke", "--data-root", str(root), "--out", str(out),
               "--fold", "0", *extra)


def test_metric_tags_group_the_metrics_csv_columns() -> None:
    assert [metric_tag(c) for c in ("train_total", "val_miou", "iou_bed", "images_per_s", "lr")] == \
        ["train/total", "val/miou", "val_iou/bed", "speed/images_per_s", "lr"]
    step, metrics = row_metrics({"epoch": 3, "lr": 0.1, "val_miou": 0.5})
    assert step == 3 and metrics == {"lr": 0.1, "val/miou": 0.5}
    assert row_metrics({"iteration": 40, "epoch": 2, "val_miou": 0.5})[0] == 40


def test_a_tracker_that_raises_is_warned_about_once_and_dropped(capsys, tmp_path) -> None:
    class Broken:
        def record(self) -> dict:
            return {}

        def log(self, metrics, step) -> None:
            raise RuntimeError("server went away")

    class Kept:
        rows: list = []

        def record(self) -> dict:
            return {"run_id": "r1"}

        def log(self, metrics, step) -> None:
            self.rows.append(step)

        def finish(self, summary, files, ok) -> None:
            self.rows.append("finished" if ok else "failed")

    tracking = Tracking({"brokenone": Broken, "keptone": Kept}, tmp_path / "trackers.json")
    for epoch in (1, 2):
        tracking.log_row({"epoch": epoch, "val_miou": 0.1})
    tracking.finish({"final/oof_miou": 0.2})
    err = capsys.readouterr().err
    assert err.count("warning: tracker brokenone: RuntimeError: server went away") == 1
    assert Kept.rows == [1, 2, "finished"]
    assert json.loads((tmp_path / "trackers.json").read_text())["keptone"] == {"run_id": "r1"}


e2e = pytest.mark.e2e  # subprocess runs: the e2e tier


@e2e
def test_failing_trackers_warn_once_and_the_fold_completes(synthetic_root, tmp_path) -> None:
    out = tmp_path / "runs"
    (out / "exp093_2" / "wandb").mkdir(parents=True)
    (out / "exp093_2" / "wandb").chmod(0o555)  # read-only: refused even by root, whom permissions do not stop
    proc = one_fold(synthetic_root, out, "--track", "wandb,mlflow",
                    "--opts", "train.mlflow_uri", "http://127.0.0.1:9")  # nothing listens on port 9
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "exp093_2" / "fold0" / "manifest.json").read_text())["status"] == "complete"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: tracker")]
    assert len(warnings) == 2, warnings
    assert any(w.startswith("warning: tracker wandb: ") for w in warnings)
    assert any(w.startswith("warning: tracker mlflow: ") and "127.0.0.1" in w for w in warnings)
    assert (out / "exp093_2" / "fold0" / "metrics.csv").read_text().count("\n") == 3  # the record of truth


@e2e
def test_a_blend_logs_to_the_trackers_and_its_leaderboard_row_names_the_runs(smoke_runs, tmp_path) -> None:
    import mlflow

    runs = Path(shutil.copytree(smoke_runs, tmp_path / "runs", ignore=shutil.ignore_patterns("last.pt")))
    subs = tmp_path / "subs"
    proc = run("ensemble/blend.py", "--runs-dir", str(runs), "--runs", "exp093_2", "exp093_5", "--name", "tb_blend",
               "--out-dir", str(subs), "--track", "mlflow,tensorboard", "--pixels", "20000", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["foldwise"], output_format="list")
    assert [r.info.run_name for r in found] == ["tb_blend"]
    blend_run = found[0]
    assert blend_run.data.tags["foldwise.kind"] == "blend" and blend_run.data.params["members"] == "exp093_2,exp093_5"
    assert {"oof/miou", "nested/miou", "test/miou"} <= set(blend_run.data.metrics)
    assert list((runs / "blends" / "tb_blend" / "tb").glob("events.out.tfevents.*"))
    with open(subs / "leaderboard.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["name"] == "tb_blend")
    assert row["trackers"] == f"mlflow:{blend_run.info.run_id} tensorboard:{runs / 'blends' / 'tb_blend' / 'tb'}"
    # is the blend really better than its members? paired over the folds (a blend: its nested held-out folds)
    proc = run("-m", "ensemble.compare", "exp093_2", "exp093_5", "tb_blend", "--runs-dir", str(runs), "--out-dir",
               str(subs))
    assert proc.returncode == 0, proc.stderr
    assert "tb_blend: blend" in proc.stdout and proc.stdout.count("verdict: ") == 2
    assert "Holm-adjusted over 2 comparisons" in proc.stdout


@e2e
@pytest.mark.parametrize("argv", [
    ["experiments/exp093_2.py", "--track", "tb"],
    ["experiments/exp093_2.py", "--track", "mlflow,mlflow"],
    ["experiments/exp093_2.py", "--opts", "train.mlflow_uri", "runs/mlflow.db"],
    ["ensemble/blend.py", "--track", "neptune"],
])
def test_bad_tracker_settings_are_one_error_line(argv, tmp_path) -> None:
    proc = run(*argv, "--out" if argv[0].startswith("experiments") else "--out-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and ("track" in lines[0] or "mlflow_uri" in lines[0])
    assert not any(tmp_path.iterdir())
