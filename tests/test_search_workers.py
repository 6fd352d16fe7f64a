"""Searches that share a study: two worker processes on one SQLite file and on one journal file; and a search whose
trials' folds go to SLURM (stand-in ``sbatch`` / ``sacct`` / ``scancel`` / ``srun`` on PATH). Two folds a trial."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_launch import slurm_stand_ins
from test_search import REPO, command, make_space, search

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from kfold.data.synthetic import generate

    out = tmp_path_factory.mktemp("workers_root") / "root"
    generate(out, n_train=16, n_test=2, size=(48, 64), seed=2, progress=False)
    return out


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_workers_share_one_study_without_a_locking_error(root, tmp_path, storage) -> None:
    out, space = tmp_path / "runs", make_space(tmp_path)
    extra = ["--storage", f"journal:{tmp_path / 'journal.log'}"] if storage == "journal" else []
    proc = search(root, out, space, "--trials", "2", "--workers", "2", "--pruner", "none", "--study", "w", *extra,
                  folds=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "locked" not in proc.stdout + proc.stderr
    import optuna

    url = (optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log")))
           if storage == "journal" else f"sqlite:///{out / 'w' / 'study.db'}")
    trials = optuna.load_study(study_name="w", storage=url).get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 2
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # one trial in each worker, at the same time
    assert len({t.user_attrs["folder"] for t in trials}) == 2
    assert trials[0].params != trials[1].params  # the workers' samplers do not repeat each other


FAKE_SLURM = {
    "sbatch": 'echo "$@" >> "$SLURM_RECORD/sbatch.args"; cp "$1" "$SLURM_RECORD/script.sh"; '
              'echo "Submitted batch job 4242"',
    "sacct": 'echo "JobID|State|NodeList"; for i in 0 1; do echo "4242_$i|RUNNING|node1"; done',
    "scancel": 'echo "$@" >> "$SLURM_RECORD/scancel.args"',
    "srun": 'echo "$@" >> "$SLURM_RECORD/srun.args"',
}


def test_slurm_launcher_submits_a_fold_array_per_trial(root, tmp_path) -> None:
    space = make_space(tmp_path)
    env, record = slurm_stand_ins(tmp_path, FAKE_SLURM)
    out = tmp_path / "runs"
    proc = subprocess.Popen(command(root, out, space, "--trials", "2", "--launcher", "slurm", "--partition", "gpu",
                                    "--study", "sl", folds=2), cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not (record / "script.sh").is_file():
        assert proc.poll() is None and time.monotonic() < end, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    time.sleep(1.0)  # the job records are written right after sbatch answers
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the waiting trial's jobs are cancelled
    proc.communicate(timeout=60)
    script = (record / "script.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --partition=gpu" in script  # the trial's 2 folds
    jobs = [json.loads((out / "sl" / "t000" / f"fold{k}" / "job.json").read_text()) for k in range(2)]
    assert [j["job_id"] for j in jobs] == ["4242_0", "4242_1"] and {j["launcher"] for j in jobs} == {"slurm"}
    assert (record / "scancel.args").is_file()
