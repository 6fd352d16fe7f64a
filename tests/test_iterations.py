"""Iteration schedules: a row per evaluation, checkpoints every N iterations, and a resume after SIGKILL that
ends with the weights of an uninterrupted run (CPU, same seed), the data stream's position included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_faults import kill_at, same_weights

from kfold.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 40 iterations of batch 4 over the 32 training ids of fold 0: 8 batches a pass, so the stream crosses five
# passes, and the kill lands mid-pass after the iteration-20 checkpoint.
ITERATIONS = ["schedule.unit", "iterations", "schedule.iterations", "40", "schedule.warmup_iterations", "10",
              "train.eval_every", "10", "train.checkpoint_every", "10"]


def experiment(root: Path, out: Path, *extra: str) -> list[str]:
    return ["experiments/exp093_2.py", "--preset", "smoke", "--data-root", str(root), "--out", str(out),
            "--fold", "0", *extra]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("iterations") / "runs"
    proc = subprocess.run([sys.executable, *experiment(synthetic_root, out, "--opts", *ITERATIONS)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "exp093_2" / "fold0"


def test_one_row_per_evaluation_with_an_iteration_column(uninterrupted) -> None:
    metrics = pd.read_csv(uninterrupted / "metrics.csv")
    assert list(metrics["iteration"]) == [10, 20, 30, 40]
    assert list(metrics["epoch"]) == [2, 3, 4, 5]  # passes of 8 batches begun by then
    assert metrics["lr"].iloc[-1] < metrics["lr"].iloc[0]  # cosine after the warm-up
    assert load_checkpoint(uninterrupted / "last.pt", __import__("torch").device("cpu"))["epoch"] == 4
    log = (uninterrupted / "train.log").read_text()
    assert "iteration 40/40 loss" in log


def test_killed_after_a_checkpoint_and_resumed_ends_with_the_same_weights(uninterrupted, synthetic_root,
                                                                         tmp_path) -> None:
    out = tmp_path / "runs"
    cmd = experiment(synthetic_root, out, "--opts", *ITERATIONS)
    kill_at(cmd, "loss:25", tmp_path)  # iteration 25: the iteration-20 checkpoint is on disk
    run_dir = out / "exp093_2" / "fold0"
    assert not (run_dir / "model.safetensors").exists()
    assert list(pd.read_csv(run_dir / "metrics.csv")["iteration"]) == [10, 20]
    proc = subprocess.run([sys.executable, *cmd, "--resume"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed {run_dir} at iteration 20/40" in (run_dir / "train.log").read_text()
    assert same_weights(run_dir / "model.safetensors", uninterrupted / "model.safetensors")
    resumed, reference = pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(uninterrupted / "metrics.csv")
    assert list(resumed["iteration"]) == [10, 20, 30, 40]
    pd.testing.assert_series_equal(resumed["val_miou"], reference["val_miou"], atol=1e-9)


def test_iteration_settings_are_checked(synthetic_root, tmp_path) -> None:
    for opts, words in ((["schedule.unit", "iterations", "schedule.iterations", "0"], "schedule.iterations"),
                        ([*ITERATIONS[:8], "train.checkpoint_every", "15"], "train.checkpoint_every: 15")):
        proc = subprocess.run([sys.executable, *experiment(synthetic_root, tmp_path / "r", "--opts", *opts)],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
