"""A distilled student end to end: teacher stores whose provenance names only fold-k models, the recovered-gain
report with its baseline and timings, refusals of broken provenance in one line, and the student as an ordinary
experiment (leaderboard, blend, predictor)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble.distill import student_main

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)


# With pseudo-labels: the test images join each fold's training with that fold's teacher targets.
OPTS = ("distill.teacher", "teach", "distill.pseudo_test", "true", "distill.min_confidence", "0.3")


def student(base: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("experiments/exp097_1.py", "--preset", "smoke", "--data-root", str(root), "--out", str(base / "runs"),
               "--submissions", str(base / "subs"), *extra, "--opts", *OPTS)


@pytest.fixture(scope="module")
def distilled(smoke_runs, synthetic_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The two smoke experiments blended into subs/teach, then exp097_1 distilled from it with its baseline."""
    base = tmp_path_factory.mktemp("distill")
    shutil.copytree(smoke_runs, base / "runs", ignore=shutil.ignore_patterns("last.pt"))
    proc = run("ensemble/blend.py", "--runs-dir", str(base / "runs"), "--runs", "exp093_2", "exp093_5", "--name",
               "teach", "--out-dir", str(base / "subs"), "--workers", "1", "--pixels", "5000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = student(base, synthetic_root, "--baseline")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base, proc


def test_teacher_stores_name_only_fold_k_models_and_the_report_says_what_was_recovered(distilled) -> None:
    base, proc = distilled
    runs = base / "runs"
    for k in range(5):
        teacher = json.loads((runs / "exp097_1" / "teacher" / f"fold{k}" / "teacher.json").read_text())
        assert teacher["fold"] == k and teacher["blend"] == "teach"
        assert [(m["experiment"], m["fold"]) for m in teacher["members"]] == [("exp093_2", k), ("exp093_5", k)]
        assert teacher["splits"] == ["train", "test"] and teacher["n"] == {"train": 32, "test": 8}
        record = json.loads((base / "subs" / "teach.json").read_text())
        assert teacher["weights"] == record["nested_folds"][k]["weights"]  # fitted without fold k
        manifest = json.loads((runs / "exp097_1" / f"fold{k}" / "manifest.json").read_text())
        assert manifest["teacher"]["members"] == teacher["members"]
        fold_dir = runs / "exp097_1" / f"fold{k}"
        assert "train_distill" in (fold_dir / "metrics.csv").read_text().splitlines()[0]
        assert f"8 test images pseudo-labelled by the fold-{k} teacher" in (fold_dir / "train.log").read_text()
    assert "recovered share of the blend's gain" in proc.stdout
    assert "baseline" in proc.stdout and "exp097_1_baseline" in proc.stdout
    assert "inference per image" in proc.stdout and "x faster" in proc.stdout
    report = json.loads((runs / "exp097_1" / "distill_report.json").read_text())
    oof = report["oof_miou"]
    gain = oof["blend_nested"] - oof["baseline"]
    if gain > 0:
        assert report["recovered"] == pytest.approx((oof["student"] - oof["baseline"]) / gain)
    else:
        assert report["recovered"] is None
    assert report["seconds_per_image"]["ensemble"] > report["seconds_per_image"]["student"] > 0
    assert set(report["per_class"]) == set(record["classes"])
    baseline = (runs / "exp097_1_baseline" / "fold0" / "config.yaml").read_text()
    assert "teacher: null" in baseline and not (runs / "exp097_1_baseline" / "teacher").exists()


def test_the_student_blends_exports_and_predicts_like_any_experiment(distilled, synthetic_root, tmp_path) -> None:
    base, _ = distilled
    proc = run("ensemble/blend.py", "--runs-dir", str(base / "runs"), "--runs", "exp097_1", "exp093_2", "--name",
               "with_student", "--out-dir", str(base / "subs"), "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    board = (base / "subs" / "leaderboard.csv").read_text()
    assert "exp097_1," in board and "with_student" in board and "distilled from teach" in board
    exported = run("-m", "ensemble.export", "--blend", "with_student", "--runs-dir", str(base / "runs"),
                   "--submissions", str(base / "subs"), "--out", str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr
    proc = run("-m", "ensemble.predict", "--model", str(tmp_path / "model"), "--images",
               str(synthetic_root / "test" / "images"), "--depths", str(synthetic_root / "test" / "depths"), "--out",
               str(tmp_path / "masks"))
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "masks").glob("*.png"))) == 8


def student_in_process(base: Path, root: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """exp097_1's command line run in this process (a refusal comes before any training): (code, stderr lines)."""
    spec = importlib.util.spec_from_file_location("exp097_1", REPO / "experiments" / "exp097_1.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    code = student_main("exp097_1", script.RECIPE, ["--preset", "smoke", "--data-root", str(root), "--out",
                                                    str(base / "runs"), "--submissions", str(base / "subs"),
                                                    "--opts", *OPTS])
    return code, capsys.readouterr().err.strip().splitlines()


def test_broken_provenance_is_one_line_naming_the_fold(distilled, synthetic_root, tmp_path, capsys) -> None:
    base, _ = distilled
    changed = tmp_path / "changed"
    shutil.copytree(base / "subs", changed / "subs")
    shutil.copytree(base / "runs", changed / "runs", ignore=shutil.ignore_patterns("exp097_1_baseline"))
    member = changed / "runs" / "exp093_2" / "fold2" / "model.safetensors"
    shutil.copy(changed / "runs" / "exp093_2" / "fold3" / "model.safetensors", member)  # fold 2 trained again
    code, lines = student_in_process(changed, synthetic_root, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: fold 2: ") and str(member) in lines[0] and "--retrain" in lines[0]

    swapped = tmp_path / "swapped"
    shutil.copytree(base / "subs", swapped / "subs")
    shutil.copytree(base / "runs", swapped / "runs", ignore=shutil.ignore_patterns("exp097_1_baseline"))
    teachers = swapped / "runs" / "exp097_1" / "teacher"
    shutil.rmtree(teachers / "fold3")
    shutil.copytree(teachers / "fold1", teachers / "fold3")
    code, lines = student_in_process(swapped, synthetic_root, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "error: fold 3: " in lines[0] and "holds fold 1's teacher targets" in lines[0]
