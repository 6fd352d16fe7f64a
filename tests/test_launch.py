"""Fold jobs through submitit, as a user launches them: local processes, a SIGKILL, a requeue, a fake SLURM.

No cluster is needed: the local launcher runs real subprocesses, and SLURM is played by small shell scripts
on PATH that record what they were given.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kfold.launch import job_argv, parse_minutes

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def experiment(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "experiments/exp093_2.py", "--preset", "smoke", "--data-root", str(root),
            "--out", str(out), *extra]


def status(out: Path, *names: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kfold.status", "--out", str(out), *names], cwd=REPO,
                          env=env or ENV, capture_output=True, text=True, timeout=60)


def states(table: str) -> dict[int, str]:
    rows = [line.split() for line in table.splitlines()[1:-1]]
    return {int(r[1]): r[2] for r in rows}


@pytest.fixture(scope="module")
def local_runs(synthetic_root, tmp_path_factory) -> Path:
    """Five smoke folds trained by ``--launcher local --jobs 2``, tracked in TensorBoard, MLflow and W&B (offline);
    the launcher's output is kept beside the runs folder as ``launch.out`` (shared; copy before changing)."""
    out = tmp_path_factory.mktemp("launch") / "runs"
    env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
    proc = subprocess.run(experiment(synthetic_root, out, "--launcher", "local", "--jobs", "2",
                                     "--track", "tensorboard,mlflow,wandb"), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (out.parent / "launch.out").write_text(proc.stdout)
    return out


def test_local_launcher_runs_each_fold_as_its_own_job(local_runs) -> None:
    records = [json.loads((local_runs / "exp093_2" / f"fold{k}" / "job.json").read_text()) for k in range(5)]
    assert all(r["launcher"] == "local" and r["state"] == "completed" for r in records)
    assert len({r["pid"] for r in records}) == 5 and len({r["job_id"] for r in records}) == 5
    jobs = local_runs / "exp093_2" / "jobs"
    for r in records:  # submitit's own per-job logs, in the runs folder
        assert Path(r["stdout"]).parent == jobs and Path(r["stderr"]).is_file()
    # the report was made once, by the job that finished last; it ends with the final validation / test table
    assert (local_runs / "exp093_2" / "leaderboard_row.json").is_file()
    final = (local_runs / "exp093_2" / "final_metrics.csv").read_text().splitlines()
    assert final[0] == "metric,validation (mean of folds),test (mean of folds),test (fold-averaged prediction)"
    shown = status(local_runs, "exp093_2")
    assert shown.returncode == 0 and states(shown.stdout) == dict.fromkeys(range(5), "complete"), shown.stdout
    assert "OOF mIoU 0." in shown.stdout


def test_parallel_fold_jobs_mirror_their_metrics_to_tensorboard_and_mlflow(local_runs) -> None:
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = local_runs / "exp093_2"
    for k in range(5):  # TensorBoard's own reader: every metrics.csv row at its step, and the final metrics
        with open(exp / f"fold{k}" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        events = EventAccumulator(str(exp / "tb" / f"fold{k}"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/total", "lr", "val/miou", "val/pixel_acc", "val_iou/wall", "speed/images_per_s",
                "final/oof_miou"} <= tags, tags
        miou = events.Scalars("val/miou")
        assert [e.step for e in miou] == [int(r["epoch"]) for r in rows]
        assert [e.value for e in miou] == pytest.approx([float(r["val_miou"]) for r in rows], abs=1e-6)
    mlflow.set_tracking_uri(f"sqlite:///{local_runs / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["foldwise"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_name for p in parents] == ["exp093_2"]
    assert sorted(c.info.run_name for c in children) == [f"exp093_2/fold{k}" for k in range(5)]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED" and child.data.params["optim.lr"] == "0.001"
        assert "val/miou" in child.data.metrics and "final/oof_miou" in child.data.metrics
        assert child.data.tags["foldwise.file.oof.npy"].split(" sha256:")[0].endswith("oof.npy")
    assert parents[0].info.status == "FINISHED" and "oof_miou" in parents[0].data.metrics
    logs = " ".join(p.read_text() for p in (exp / "jobs").glob("*_log.err"))
    assert "warning: tracker" not in logs and "locked" not in logs  # two jobs at once: no database error
    row = json.loads((exp / "leaderboard_row.json").read_text())  # the leaderboard row leads to the curves
    assert f"mlflow:{parents[0].info.run_id}" in row["trackers"] and "tensorboard:" in row["trackers"]
    assert "wandb:exp093_2" in row["trackers"]


def test_wandb_keeps_an_offline_run_per_fold_and_the_launcher_prints_the_sync_command(local_runs) -> None:
    exp = local_runs / "exp093_2"
    records = [json.loads((exp / f"fold{k}" / "trackers.json").read_text())["wandb"] for k in range(5)]
    assert {r["mode"] for r in records} == {"offline"} and {r["group"] for r in records} == {"exp093_2"}
    for r in records:
        offline = Path(r["dir"])
        assert offline.parent == exp / "wandb" and list(offline.glob("run-*.wandb")), r
    sync = [line for line in (local_runs.parent / "launch.out").read_text().splitlines() if "wandb sync" in line]
    assert len(sync) == 1 and all(r["dir"] in sync[0] for r in records)


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _task_pid(run_dir: Path) -> int | None:
    try:
        record = json.loads((run_dir / "job.json").read_text())
    except (OSError, ValueError):
        return None
    return record.get("pid") if record.get("state") == "running" else None


def test_a_killed_fold_shows_failed_and_a_requeued_fold_resumes(synthetic_root, tmp_path) -> None:
    out = tmp_path / "runs"
    cmd = experiment(synthetic_root, out, "--fold", "2,3", "--opts", "schedule.epochs", "12", "--launcher", "local",
                     "--jobs", "2")
    fold2, fold3 = out / "exp093_2" / "fold2", out / "exp093_2" / "fold3"
    launcher = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (fold3 / "last.pt").is_file() and _task_pid(fold3))
        os.kill(_task_pid(fold3), signal.SIGKILL)  # an out-of-memory kill: no record, no result
        _wait_for(lambda: (fold2 / "last.pt").is_file() and _task_pid(fold2))
        os.kill(_task_pid(fold2), signal.SIGUSR2)  # what SLURM sends before a time limit or preemption
        _, err = launcher.communicate(timeout=600)
    finally:
        launcher.kill()
    assert launcher.returncode == 1 and "fold(s) 3 failed" in err, err

    record = json.loads((fold2 / "job.json").read_text())
    assert record["state"] == "completed" and record["attempt"] == 2 and "requeued" in record
    assert "resumed" in (fold2 / "train.log").read_text()
    with open(fold2 / "metrics.csv", newline="") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == list(range(1, 13))  # no finished epoch trained twice, none lost

    shown = status(out, "exp093_2")
    assert shown.returncode == 1, shown.stdout
    assert states(shown.stdout) == {0: "missing", 1: "missing", 2: "complete", 3: "failed", 4: "missing"}
    assert "killed?" in shown.stdout and "log " in shown.stdout

    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "fold 2: complete, skipped" in again.stdout and "fold 3: started job" in again.stdout
    assert "fold 2: started" not in again.stdout
    assert "resumed" in (fold3 / "train.log").read_text()
    assert states(status(out, "exp093_2").stdout)[3] == "complete"


FAKE_SLURM = {
    "sbatch": 'cp "$1" "$SLURM_RECORD/script.sh"; echo "$@" >> "$SLURM_RECORD/sbatch.args"; '
              'echo "Submitted batch job 4242"',
    "srun": 'echo "$@" >> "$SLURM_RECORD/srun.args"',
    "sacct": 'echo "JobID|State|NodeList"',
    "scancel": 'echo "$@" >> "$SLURM_RECORD/scancel.args"',
}


def slurm_stand_ins(tmp_path: Path, scripts: dict[str, str] = FAKE_SLURM) -> tuple[dict, Path]:
    """(an environment with ``scripts`` on PATH as SLURM's commands, the folder they record into)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_RECORD": str(record)}, record


@pytest.fixture
def fake_slurm(tmp_path) -> tuple[dict, Path]:
    return slurm_stand_ins(tmp_path)


def test_slurm_array_covers_exactly_the_unfinished_folds(local_runs, synthetic_root, tmp_path, fake_slurm) -> None:
    env, record = fake_slurm
    out = Path(shutil.copytree(local_runs, tmp_path / "runs"))
    for k in (2, 3, 4):
        shutil.rmtree(out / "exp093_2" / f"fold{k}")
    cmd = experiment(synthetic_root, out, "--launcher", "slurm", "--partition", "gpu", "--gpus-per-fold", "1",
                     "--time", "02:00:00", "--slurm", "qos=high")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4242_0" in proc.stdout and "4242_2" in proc.stdout and "kfold.status" in proc.stdout
    script = (record / "script.sh").read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=120", "#SBATCH --signal=USR2@120", "#SBATCH --qos=high",
                 "#SBATCH --output=" + str(out / "exp093_2" / "jobs")):
        assert line in script, (line, script)
    assert "submitit.core._submit" in script  # submitit's own script, not ours
    jobs = {k: json.loads((out / "exp093_2" / f"fold{k}" / "job.json").read_text()) for k in (2, 3, 4)}
    assert [jobs[k]["job_id"] for k in (2, 3, 4)] == ["4242_0", "4242_1", "4242_2"]
    assert all(j["state"] == "pending" and j["launcher"] == "slurm" for j in jobs.values())
    shown = status(out, "exp093_2", env=env)
    assert states(shown.stdout) == {0: "complete", 1: "complete", 2: "pending", 3: "pending", 4: "pending"}


def test_launcher_flags_are_checked_before_anything_is_submitted(synthetic_root, tmp_path, fake_slurm) -> None:
    env, record = fake_slurm
    for flags, words in ((["--launcher", "slurm", "--time", "2h"], "--time '2h'"),
                         (["--launcher", "local", "--jobs", "0"], "--jobs 0"),
                         (["--launcher", "slurm", "--slurm", "qos"], "--slurm 'qos'"),
                         (["--launcher", "slurm", "--slurm", "no_such_option=1"], "no_such_option"),
                         (["--launcher", "slurm", "--opts", "train.ema_decay", "2"], "train.ema_decay")):
        proc = subprocess.run(experiment(synthetic_root, tmp_path / "runs", *flags), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert not (record / "sbatch.args").exists()


def test_job_command_line_and_time_parsing() -> None:
    argv = ["--preset", "smoke", "--launcher", "slurm", "--fold", "0,1", "--time=01:00:00", "--retrain", "--slurm",
            "qos=high", "--opts", "optim.lr", "1e-3"]
    assert job_argv(argv) == ["--preset", "smoke", "--opts", "optim.lr", "1e-3"]
    assert parse_minutes("02:00:00") == 120 and parse_minutes("90") == 90 and parse_minutes("00:00:30") == 1
