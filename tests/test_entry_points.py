"""Every entry point as a user types it: bad input is one ``error:`` line and exit 2, answers come fast, and a
finished fold is never silently reused under another recipe."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kfold.config import ConfigError, build_recipe
from kfold.validate import CHOICES, validate_recipe

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def not_hdf5(tmp_path: Path) -> Path:
    path = tmp_path / "fake.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5" + bytes(600))
    return path


@pytest.fixture
def used_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "used"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    return folder


def cases(tmp: Path, not_hdf5: Path, used: Path, root: Path) -> list[tuple[list[str], list[str]]]:
    """(command line, words its error line must hold): one bad file, key or value at a time."""
    missing = tmp / "missing"
    return [
        (["-m", "kfold.data.nyuv2", str(missing / "x.mat"), "--out", str(tmp / "o1")], [str(missing / "x.mat")]),
        (["-m", "kfold.data.nyuv2", str(not_hdf5), "--out", str(tmp / "o2")], [str(not_hdf5), "not an HDF5"]),
        (["-m", "kfold.data.nyuv2", str(not_hdf5), "--out", str(used)], [str(used), "not empty"]),
        (["-m", "kfold.data.nyuv2", str(not_hdf5), "--out", str(tmp / "o3"), "--meta", str(missing)], [str(missing)]),
        (["-m", "kfold.data.nyuv2", str(not_hdf5), "--out", str(tmp / "o4"), "--split", "odd"], ["--split", "odd"]),
        (["-m", "kfold.data.synthetic", "--out", str(tmp / "s1"), "--train", "-3"], ["--train", "-3"]),
        (["-m", "kfold.data.synthetic", "--out", str(tmp / "s2"), "--test", "-1"], ["--test", "-1"]),
        (["-m", "kfold.data.synthetic", "--out", str(tmp / "s3"), "--size", "10by20"], ["--size", "10by20"]),
        (["-m", "kfold.data.synthetic", "--out", str(used), "--train", "2", "--test", "0"], [str(used)]),
        (["-m", "kfold.splits", "--data-root", str(missing)], [str(missing)]),
        (["-m", "kfold.splits", "--data-root", str(root), "--k", "1"], ["--k", "1"]),
        (["-m", "kfold.report", "--runs", str(missing)], [str(missing)]),
        (["experiments/exp093_2.py", "--data-root", str(missing), "--preset", "smoke", "--out", str(tmp / "r")],
         [str(missing)]),
        (["experiments/exp093_2.py", "--fold", "9", "--preset", "smoke"], ["--fold", "9"]),
        (["experiments/exp093_2.py", "--preset", "huge"], ["preset", "huge"]),
        (["experiments/exp093_2.py", "--opts", "train.ema_decay", "1.2"], ["train.ema_decay", "1.2"]),
        (["ensemble/blend.py", "--runs-dir", str(missing)], [str(missing)]),
        (["ensemble/blend.py", "--workers", "0"], ["--workers"]),
        (["-m", "ensemble.compare", "exp093_2", "--runs-dir", str(missing)], ["at least two"]),
        (["-m", "ensemble.compare", "a", "b", "--runs-dir", str(missing)], [str(missing)]),
        (["-m", "kfold.search", "exp093_2", "--space", str(missing / "s.yaml"), "--trials", "2", "--out",
          str(tmp / "r2")], [str(missing / "s.yaml")]),
        (["-m", "kfold.search", "exp093_2", "--space", "s.yaml", "--trials", "0"], ["--trials"]),
        (["-m", "kfold.search", "exp093_2", "--space", "s.yaml", "--trials", "2", "--launcher", "local", "--jobs",
          "0"], ["--jobs 0"]),
        (["-m", "submissions.score", str(missing / "s.csv"), "--labels", str(root / "test_labels")],
         [str(missing / "s.csv")]),
        (["-m", "submissions.leaderboard", "--path", str(tmp / "lb.csv"), "--record-lb", "x", "high"],
         ["--record-lb", "high"]),
    ]


@pytest.mark.e2e
def test_every_entry_point_answers_bad_input_with_one_error_line(tmp_path, not_hdf5, used_folder,
                                                                  synthetic_root) -> None:
    for argv, words in cases(tmp_path, not_hdf5, used_folder, synthetic_root):
        proc = run(*argv)
        assert_one_error_line(proc, *words)
    assert [p.name for p in used_folder.iterdir()] == ["keep.txt"]  # a refused --out is left as it was
    for name in ("o1", "o2", "o3", "o4", "s1", "s2", "s3", "r", "r2"):  # nothing that looks like a result
        assert not (tmp_path / name).exists(), name


def test_debug_shows_the_traceback(tmp_path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    proc = run("-m", "kfold.data.synthetic", "--out", str(used), "--train", "3", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {used}: output folder exists and is not empty")


def test_an_import_that_fails_half_way_leaves_nothing_that_looks_like_a_root(tmp_path) -> None:
    from test_nyuv2 import SCENES, _frames, write_mat

    rgb, depth, _, labels = _frames()
    labels[4, 3, 3] = 5000  # frame 5: a raw id outside the label map, found after frames 1-4 were written
    mat = write_mat(tmp_path / "nyu.mat", rgb, depth, labels, SCENES)
    meta = tmp_path / "meta"
    meta.mkdir()
    from kfold.data import nyuv2

    (meta / nyuv2.MAP_FILE).write_text((nyuv2.META_DIR / nyuv2.MAP_FILE).read_text())
    proc = run("-m", "kfold.data.nyuv2", str(mat), "--out", str(tmp_path / "out"), "--split", "all-train",
               "--meta", str(meta))
    assert_one_error_line(proc, str(mat), "frame 5", "5000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta", "nyu.mat"]


def test_the_importer_needs_nothing_beside_the_repository(tmp_path) -> None:
    from test_nyuv2 import SCENES, _frames, write_mat

    rgb, depth, _, labels = _frames()
    mat = write_mat(tmp_path / "nyu.mat", rgb, depth, labels, SCENES)
    proc = run("-m", "kfold.data.nyuv2", str(mat), "--out", str(tmp_path / "out"), "--split", "all-train")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "out" / "train" / "labels").glob("*.png"))) == len(SCENES)


@pytest.mark.parametrize("argv", [["--help"], ["--opts", "optim.lrr", "1"], ["--opts", "train.batch_size", "-4"],
                                  ["--opts", "data.crop_size", "[800, 800]"]])
def test_help_and_bad_opts_are_answered_before_torch_is_imported(argv) -> None:
    code = ("import sys; from kfold.cli import main\n"
            f"try:\n    rc = main('exp093_2', {{}}, {argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "heavy = sorted(m for m in ('torch', 'segmentation_models_pytorch', 'timm', 'albumentations', 'cv2')"
            " if m in sys.modules)\nprint('HEAVY', heavy, 'RC', rc)")
    proc = run("-c", code)
    assert "HEAVY [] RC" in proc.stdout, (proc.stdout, proc.stderr)
    assert ("RC 0" if argv == ["--help"] else "RC 2") in proc.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--opts", "distill.alpha", "-1"], ["--submissions", "nowhere"]])
def test_a_students_help_bad_opts_and_missing_blend_are_answered_before_torch_is_imported(argv) -> None:
    code = ("import sys; from ensemble.distill import student_main\n"
            f"try:\n    rc = student_main('exp097_1', {{'distill.teacher': 'b'}}, {argv!r})\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "heavy = sorted(m for m in ('torch', 'segmentation_models_pytorch', 'timm', 'albumentations', 'cv2')"
            " if m in sys.modules)\nprint('HEAVY', heavy, 'RC', rc)")
    proc = run("-c", code)
    assert "HEAVY [] RC" in proc.stdout, (proc.stdout, proc.stderr)
    assert ("RC 0" if argv == ["--help"] else "RC 2") in proc.stdout


@pytest.mark.parametrize("key, value, words", [
    ("train.batch_size", -1, "train.batch_size: must be >= 1"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.ema_decay", 1.0, "train.ema_decay: must be in [0, 1)"),
    ("train.ema_decay", 1.5, "train.ema_decay"),
    ("data.crop_size", (800, 100), "data.crop_size"),
    ("data.input_size", (0, 96), "data.input_size"),
    ("data.hflip", 1.5, "data.hflip"),
    ("data.k_folds", 1, "data.k_folds"),
    ("data.in_channels", 5, "data.in_channels"),
    ("model.arch", "unet", "model.arch"),
    ("model.decoder_channels", 100, "model.decoder_channels: FPN needs a multiple of 64"),
    ("loss.ohem_fraction", 0.0, "loss.ohem_fraction"),
    ("loss.depth_loss", "l2", "loss.depth_loss"),
    ("loss.class_weights", {"books": -1.0}, "loss.class_weights.books"),
    ("optim.lr", 0.0, "optim.lr"),
    ("optim.lr", float("nan"), "optim.lr: must be a finite number"),
    ("optim.name", "adam", "optim.name"),
    ("optim.momentum", 1.0, "optim.momentum"),
    ("optim.grad_clip", -1.0, "optim.grad_clip"),
    ("schedule.epochs", 0, "schedule.epochs"),
    ("schedule.warmup_lr_ratio", 0.0, "schedule.warmup_lr_ratio"),
    ("train.amp", "fp8", "train.amp"),
    ("train.select", "first", "train.select"),
    ("tta.scales", (1.0, -0.5), "tta.scales"),
    ("tta.scales", (), "tta.scales"),
    ("tta.temperature", 0.0, "tta.temperature"),
    ("oof.scale", 1.5, "oof.scale"),
])
def test_a_bad_value_is_refused_naming_its_key(key, value, words) -> None:
    recipe = build_recipe({}, "smoke", {})
    *path, name = key.split(".")
    setattr(getattr(recipe, path[0]), name, value)  # bypass type coercion: check the values only
    with pytest.raises(ConfigError, match="^" + words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate_recipe(recipe)


@pytest.mark.parametrize("preset", ["full", "demo", "smoke"])
def test_every_shipped_recipe_passes_the_checks(preset) -> None:
    from kfold.losses import DEPTH_LOSSES, WEIGHTINGS
    from kfold.models import ARCHS

    for script in sorted((REPO / "experiments").glob("exp*.py")):
        spec = importlib.util.spec_from_file_location(script.stem, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # the recipe only: main() runs under __main__
        validate_recipe(build_recipe(module.RECIPE, preset))
    assert tuple(ARCHS) == CHOICES["model.arch"]
    assert CHOICES["loss.depth_loss"] == DEPTH_LOSSES and CHOICES["loss.weighting"] == WEIGHTINGS


def _lr(run_dir: Path) -> float:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["recipe"]["optim"]["lr"]


@pytest.mark.e2e
def test_a_finished_fold_is_not_reused_under_another_recipe(synthetic_root, tmp_path) -> None:
    exp = ["experiments/exp093_2.py", "--preset", "smoke", "--data-root", str(synthetic_root), "--out",
           str(tmp_path / "runs"), "--fold", "0"]
    fold = tmp_path / "runs" / "exp093_2" / "fold0"
    assert run(*exp).returncode == 0
    manifest = (fold / "manifest.json").read_bytes()

    same = run(*exp, "--num_workers", "1", "--opts", "oof.batch_size", "3")  # result-neutral keys only
    assert same.returncode == 0 and "complete, skipped" in same.stdout, same.stderr

    other = run(*exp, "--opts", "optim.lr", "0.002")
    line = assert_one_error_line(other, str(fold), "optim.lr", "0.001 -> 0.002", "--retrain", "--out")
    assert "experiment name" in line
    assert (fold / "manifest.json").read_bytes() == manifest and _lr(fold) == 0.001

    again = run(*exp, "--opts", "optim.lr", "0.002", "--retrain")
    assert again.returncode == 0, again.stderr
    assert "cleared for --retrain" in again.stdout
    assert json.loads((fold / "manifest.json").read_text())["status"] == "complete" and _lr(fold) == 0.002
    assert np.load(fold / "oof.npy", mmap_mode="r").dtype == np.float16
