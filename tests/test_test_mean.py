"""The fold-mean test store: written once when the last fold completes, read by the blend instead of k fold
stores, made on first use for stores written before it existed, and never stale."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kfold.store.read import open_experiment
from kfold.store.write import write_test_mean

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(smoke_runs, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("mean") / "runs"
    shutil.copytree(smoke_runs / "exp093_2", runs / "exp093_2", ignore=shutil.ignore_patterns("last.pt"))
    return runs


def blend(runs: Path, out: Path) -> bytes:
    proc = run("ensemble/blend.py", "--runs-dir", str(runs), "--runs", "exp093_2", "--name", "b", "--out-dir",
               str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (out / "b.csv").read_bytes()


def test_the_last_fold_writes_the_mean_and_the_blend_reads_it(trained, tmp_path) -> None:
    store = open_experiment(trained, "exp093_2")
    assert store.test_mean is not None and store.test_mean.dtype == np.float32
    record = json.loads((trained / "exp093_2" / "test_mean.json").read_text())
    assert [f["sha256"] for f in record["folds"]] == [fa.manifest.scores["test_sha256"] for fa in store.fold_arrays]
    from_mean = np.concatenate([p for _, p in store.iter_test(chunk=3)])
    from_folds = np.concatenate([p for _, p in store.iter_test(chunk=3, from_folds=True)])
    assert np.array_equal(from_mean, from_folds)  # the very float32 values, not a rounding of them

    with_mean = blend(trained, tmp_path / "a")
    old = Path(shutil.copytree(trained, tmp_path / "old"))  # as written before fold means existed
    for name in ("test_mean.npy", "test_mean.json"):
        (old / "exp093_2" / name).unlink()
    assert blend(old, tmp_path / "b") == with_mean
    assert (old / "exp093_2" / "test_mean.json").is_file()  # made on first use and kept

    lean = Path(shutil.copytree(trained, tmp_path / "lean"))
    write_test_mean(open_experiment(lean, "exp093_2"), keep_fold_test=False)
    assert not any((lean / "exp093_2").glob("fold*/test.npy"))
    assert blend(lean, tmp_path / "c") == with_mean


def test_a_fold_predicted_again_invalidates_the_mean(trained, tmp_path) -> None:
    runs = Path(shutil.copytree(trained, tmp_path / "runs"))
    manifest_path = runs / "exp093_2" / "fold2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["test_sha256"] = "0" * 64  # as if fold 2's test store had been written again
    manifest_path.write_text(json.dumps(manifest))
    assert open_experiment(runs, "exp093_2").test_mean is None
    (runs / "exp093_2" / "fold2" / "test.npy").unlink()
    with pytest.raises(ValueError, match="test.npy missing and .*test_mean.json does not match the folds"):
        open_experiment(runs, "exp093_2")
