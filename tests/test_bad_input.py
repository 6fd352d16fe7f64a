"""Bad input: every malformed file, store, submission or setting gives one clear line and a non-zero exit.

The corpus below breaks one thing at a time in a copy of the session's synthetic root, in a valid OOF store
or in a valid submission, then runs the real entry point. Each must exit non-zero with one ``error: ...``
line naming the file, key or value (a traceback only with ``--debug``), and write nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from faults.stores import write_store
from PIL import Image
from safetensors.torch import save_file

from ensemble.blend import main as blend_main
from kfold.cli import main as cli_main
from kfold.data.layout import DEFAULT_CLASSES
from kfold.models import read_state_dict
from kfold.splits import main as splits_main
from kfold.store.read import open_experiment
from submissions.score import main as score_main
from submissions.validate import read_submission
from submissions.writer import write_submission

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EXP = "exp093_2"
SMOKE = ["--preset", "smoke", "--num_workers", "0"]


class Escaped(Exception):
    """An exception escaped an entry point's ``main``: the user would see a traceback, not one line."""


def error_line(err: str, *names: str, alone: bool = False) -> str:
    """Stderr ends with one ``error: ...`` line holding every one of ``names``; no traceback anywhere.

    Args:
        err: the captured stderr (progress lines may come first unless ``alone``).
        names: file paths, keys, values the line must name.
        alone: the error line must be all of stderr (the input was refused before any work).
    """
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert not alone or len(lines) == 1, err
    for name in names:
        assert name in lines[-1], (name, lines[-1])
    return lines[-1]


def call(main: Callable[..., int], *args, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run an entry point's ``main`` here; an exception that escapes it (a traceback for the user) fails."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(*args)
    except SystemExit as err:  # argparse
        code = err.code
    except Exception as err:  # noqa: BLE001 - exactly what the user would see as a traceback
        raise Escaped(f"{type(err).__name__} escaped main() as a traceback: {err}") from None
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err


def run(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def last_line_without_traceback(code: int, err: str, *names: str) -> None:
    """A real command line: non-zero exit, stderr ends with one ``error:`` line naming ``names``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and lines and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and all(n in lines[-1] for n in names), err


# ------------------------------------------------------------------------------------ the dataset-root corpus
def _id(root: Path, n: int = 3) -> str:
    return sorted(p.stem for p in (root / "train" / "images").glob("*.png"))[n]


def truncated_png(root: Path) -> tuple[Path, str]:
    path = root / "train" / "images" / f"{_id(root)}.png"
    path.write_bytes(path.read_bytes()[:400])
    return path, "truncated"


def label_value_14(root: Path) -> tuple[Path, str]:
    path = root / "train" / "labels" / f"{_id(root)}.png"
    label = np.array(Image.open(path))
    label[5, 7] = 14
    Image.fromarray(label).save(path)
    return path, "label value 14"


def depth_8bit(root: Path) -> tuple[Path, str]:
    path = root / "train" / "depths" / f"{_id(root)}.png"
    Image.fromarray((np.array(Image.open(path)) // 256).astype(np.uint8)).save(path)
    return path, "8-bit depth"


def rgba_image(root: Path) -> tuple[Path, str]:
    path = root / "train" / "images" / f"{_id(root)}.png"
    Image.open(path).convert("RGBA").save(path)
    return path, "mode RGBA"


def image_of_another_size(root: Path) -> tuple[Path, str]:
    path = root / "train" / "images" / f"{_id(root)}.png"
    Image.open(path).resize((60, 40)).save(path)
    return path, "size 40x60"


def ids_differ_images_labels(root: Path) -> tuple[Path, str]:
    path = root / "train" / "labels" / f"{_id(root)}.png"
    path.rename(path.with_name(f"{_id(root)}_x.png"))
    return path, "missing label"


def scenes_unknown_id(root: Path) -> tuple[Path, str]:
    path = root / "scenes.csv"
    path.write_text(path.read_text() + "r9999_v0,room9999\n")
    return path, "unknown id 'r9999_v0'"


def folds_with_a_fold_missing(root: Path) -> tuple[Path, str]:
    path = root / "folds.csv"
    path.write_text(path.read_text().replace(",2\n", ",0\n"))
    return path, "fold 2 of 0..4 has no image"


ROOT_CORPUS = [truncated_png, label_value_14, depth_8bit, rgba_image, image_of_another_size,
               ids_differ_images_labels, scenes_unknown_id, folds_with_a_fold_missing]


@pytest.fixture
def bad_root(synthetic_root: Path, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path, str]:
    """(root, offending file, words the message must hold): a copy of the synthetic root broken one way."""
    root = Path(shutil.copytree(synthetic_root, tmp_path / "root", ignore=shutil.ignore_patterns(".folds.lock")))
    return root, *request.param(root)


@pytest.mark.parametrize("bad_root", ROOT_CORPUS, indirect=True, ids=lambda f: f.__name__)
def test_experiment_on_a_bad_root_is_one_line_naming_the_file(bad_root, tmp_path, capsys) -> None:
    root, path, words = bad_root
    out = tmp_path / "runs"
    code, err = call(cli_main, EXP, {}, ["--data-root", str(root), "--out", str(out), *SMOKE], capsys=capsys)
    assert code == 2
    error_line(err, str(path), words, alone=True)
    assert not out.exists()  # nothing written


@pytest.mark.e2e
def test_experiment_command_line_is_one_line_and_a_traceback_only_with_debug(synthetic_root, tmp_path,
                                                                            capsys) -> None:
    root = Path(shutil.copytree(synthetic_root, tmp_path / "root", ignore=shutil.ignore_patterns(".folds.lock")))
    path, words = truncated_png(root)
    args = ["--data-root", str(root), "--out", str(tmp_path / "runs"), *SMOKE]
    last_line_without_traceback(*finish(run([f"experiments/{EXP}.py", *args])), str(path), words)
    # --debug prints the traceback before the error line (here, without paying another start-up).
    assert cli_main(EXP, {}, [*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError" in err and err.strip().splitlines()[-1].startswith(f"error: {path}")


@pytest.mark.parametrize("bad_root", [truncated_png, folds_with_a_fold_missing], indirect=True,
                         ids=lambda f: f.__name__)
def test_splits_on_a_bad_root_is_one_line_naming_the_file(bad_root, capsys) -> None:
    root, path, words = bad_root
    code, err = call(splits_main, ["--data-root", str(root), "--k", "5"], capsys=capsys)
    assert code == 2
    error_line(err, str(path), words, alone=True)


@pytest.mark.e2e
@pytest.mark.parametrize("bad_root", [folds_with_a_fold_missing], indirect=True, ids=lambda f: f.__name__)
def test_splits_command_line_on_a_bad_root_is_one_line(bad_root) -> None:
    root, path, words = bad_root
    last_line_without_traceback(*finish(run(["-m", "kfold.splits", "--data-root", str(root), "--k", "5"])),
                                str(path), words)


# ----------------------------------------------------------------------------------------- the recipe corpus
@pytest.mark.parametrize(("opts", "words"), [
    (["optim.lrr", "1e-3"], ["'optim.lrr'", "optim.lr"]),  # a key that does not exist: the close real ones
    (["train.batch_size", "four"], ["train.batch_size", "'four'"]),  # a value of the wrong type
    (["tta.scales", "{a: 1}"], ["tta.scales"]),
    (["optim.lr"], ["'optim.lr' has no value"]),
])
def test_bad_opts_are_one_line_naming_key_and_value(synthetic_root, tmp_path, capsys, opts, words) -> None:
    out = tmp_path / "runs"
    code, err = call(cli_main, EXP, {}, ["--data-root", str(synthetic_root), "--out", str(out), *SMOKE,
                                         "--opts", *opts], capsys=capsys)
    assert code == 2
    error_line(err, *words)
    assert not out.exists()


@pytest.mark.parametrize("payload", [
    "__import__('pathlib').Path('{marker}').touch()",
    "!!python/object/apply:pathlib.Path.touch ['{marker}']",
])
def test_opts_values_are_parsed_never_evaluated(synthetic_root, tmp_path, capsys, payload) -> None:
    marker = tmp_path / "payload-ran"
    for key in ("optim.lr", "model.arch"):  # a float is type-checked; a string is taken as text, never run
        code, err = call(cli_main, EXP, {}, ["--data-root", str(synthetic_root), "--out", str(tmp_path / "runs"),
                                             *SMOKE, "--opts", key, payload.format(marker=marker)], capsys=capsys)
        assert code == 2
        error_line(err, key)
        assert not marker.exists()


def test_a_config_file_with_a_bad_key_or_value_is_one_line(synthetic_root, tmp_path, capsys) -> None:
    for body, words in [("optim:\n  lrr: 1\n", "'optim.lrr'"), ("optim:\n  lr: fast\n", "'fast'")]:
        config = tmp_path / "config.yaml"
        config.write_text("recipe:\n" + "".join(f"  {line}\n" for line in body.splitlines()))
        code, err = call(cli_main, EXP, {}, ["--config", str(config), "--data-root", str(synthetic_root),
                                             "--out", str(tmp_path / "runs")], capsys=capsys)
        assert code == 2
        error_line(err, words)


def test_an_unparsable_config_file_is_one_line_naming_it(synthetic_root, tmp_path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("recipe: [unclosed\n")
    code, err = call(cli_main, EXP, {}, ["--config", str(config), "--data-root", str(synthetic_root),
                                         "--out", str(tmp_path / "runs")], capsys=capsys)
    assert code == 2
    error_line(err, str(config))


@pytest.mark.parametrize("cut", [500, 4])  # a cut body, a cut header
def test_a_truncated_safetensors_file_is_a_one_line_error_naming_it(tmp_path, cut) -> None:
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, weights)
    weights.write_bytes(weights.read_bytes()[:cut])
    with pytest.raises(ValueError, match=re.escape(str(weights))) as info:
        read_state_dict(weights)
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------------------- the OOF store corpus
def nan_in_oof(exp: Path) -> tuple[Path, str]:
    path = exp / "fold1" / "oof.npy"
    a = np.load(path)
    a[2, 4, 3, 3] = np.nan
    np.save(path, a)
    ids = (exp / "fold1" / "oof_ids.txt").read_text().split()
    return path, f"row 2 (id '{ids[2]}'): NaN or infinite"


def negative_in_oof(exp: Path) -> tuple[Path, str]:
    path = exp / "fold2" / "oof.npy"
    a = np.load(path)
    a[0, 1, 0, 0] = -0.5
    np.save(path, a)
    ids = (exp / "fold2" / "oof_ids.txt").read_text().split()
    return path, f"row 0 (id '{ids[0]}'): negative"


def wrong_class_count_array(exp: Path) -> tuple[Path, str]:
    path = exp / "fold3" / "oof.npy"
    a = np.load(path)[:, :12]
    np.save(path, a)
    return path, f"shape {a.shape}, manifest says"


STORE_CORPUS = [nan_in_oof, negative_in_oof, wrong_class_count_array]


@pytest.fixture(scope="module")
def store(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid complete experiment store ``exp_a`` (checked once here) to copy and break."""
    runs = tmp_path_factory.mktemp("store") / "runs"
    write_store(runs, "exp_a", synthetic_root, seed=3)
    open_experiment(runs, "exp_a").check_values()
    return runs


def blend_args(runs: Path, out: Path) -> list[str]:
    return ["--runs-dir", str(runs), "--runs", "exp_a", "--out-dir", str(out), "--method", "uniform",
            "--no-temperature", "--pixels", "2000"]


@pytest.mark.e2e
@pytest.mark.parametrize("breaker", STORE_CORPUS, ids=lambda f: f.__name__)
def test_blend_of_a_bad_store_is_one_line_naming_the_file(store, tmp_path, capsys, breaker) -> None:
    runs = Path(shutil.copytree(store, tmp_path / "runs"))
    path, words = breaker(runs / "exp_a")
    out = tmp_path / "sub"
    code, err = call(blend_main, blend_args(runs, out), capsys=capsys)
    assert code == 2
    error_line(err, str(path), words)
    assert not out.exists()


def test_blend_of_a_store_with_another_class_count_than_its_root(synthetic_root, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    write_store(runs, "exp_a", synthetic_root, classes=list(DEFAULT_CLASSES[:12]))
    code, err = call(blend_main, blend_args(runs, tmp_path / "sub"), capsys=capsys)
    assert code == 2
    error_line(err, str(synthetic_root), "classes", "differ")


@pytest.mark.e2e
def test_blend_command_line_is_one_line_and_a_traceback_only_with_debug(store, tmp_path, capsys) -> None:
    runs = Path(shutil.copytree(store, tmp_path / "runs"))
    path, words = nan_in_oof(runs / "exp_a")
    args = blend_args(runs, tmp_path / "sub")
    last_line_without_traceback(*finish(run(["ensemble/blend.py", *args])), str(path), words)
    code, err = call(blend_main, [*args, "--debug"], capsys=capsys)
    assert code == 2 and "Traceback" in err and str(path) in err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------- the submission corpus
@pytest.fixture(scope="module")
def submission(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid submission of the test labels (255 -> class 0): scores mIoU 1 on the labelled pixels."""
    labels = synthetic_root / "test_labels"
    maps = [(p.stem, np.where((a := np.array(Image.open(p))) == 255, 0, a)) for p in sorted(labels.glob("*.png"))]
    path = tmp_path_factory.mktemp("sub") / "good.csv"
    write_submission(path, maps, len(DEFAULT_CLASSES))
    return path


def _rows(path: Path) -> list[list[str]]:
    return read_submission(path).values.tolist()


def _write(path: Path, rows: list[list[str]]) -> None:
    path.write_text("ImageId,ClassId,EncodedPixels\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))


def _first_nonempty(rows: list[list[str]]) -> int:
    return next(i for i, r in enumerate(rows) if r[2])


def odd_length_rle(rows: list[list[str]]) -> str:
    i = _first_nonempty(rows)
    rows[i][2] = " ".join(rows[i][2].split()[:-1])
    return f"line {i + 2} ({rows[i][0]}, class {rows[i][1]}): RLE has an odd number of values"


def out_of_bounds_run(rows: list[list[str]]) -> str:
    i = next(i for i, r in enumerate(rows) if not r[2])
    rows[i][2] = "3070 10"  # 48 x 64 = 3072 pixels
    return f"line {i + 2} ({rows[i][0]}, class {rows[i][1]}): RLE run 3070 10 ends at pixel 3079"


def overlapping_classes(rows: list[list[str]]) -> str:
    i = _first_nonempty(rows)
    j = next(j for j, r in enumerate(rows) if r[0] == rows[i][0] and r[1] != rows[i][1] and not r[2])
    rows[j][2] = rows[i][2]  # a second class claims the pixels of the first
    return f"image '{rows[i][0]}': pixel {rows[i][2].split()[0]} (order C) is claimed by classes"


def unknown_id(rows: list[list[str]]) -> str:
    rows[5][0] = "r9999_v9"
    return "line 7: unknown ImageId 'r9999_v9'"


SUBMISSION_CORPUS = [odd_length_rle, out_of_bounds_run, overlapping_classes, unknown_id]


@pytest.mark.parametrize("breaker", SUBMISSION_CORPUS, ids=lambda f: f.__name__)
def test_scoring_a_bad_submission_is_one_line_naming_line_id_and_value(synthetic_root, submission, tmp_path,
                                                                        capsys, breaker) -> None:
    labels = str(synthetic_root / "test_labels")
    assert call(score_main, [str(submission), "--labels", labels], capsys=capsys)[0] == 0  # the control
    rows = _rows(submission)
    words = breaker(rows)
    bad = tmp_path / "bad.csv"
    _write(bad, rows)
    code, err = call(score_main, [str(bad), "--labels", labels], capsys=capsys)
    assert code == 2
    error_line(err, str(bad), words, alone=True)


def test_score_command_line_is_one_line_and_a_traceback_only_with_debug(synthetic_root, submission,
                                                                        tmp_path, capsys) -> None:
    rows = _rows(submission)
    words = odd_length_rle(rows)
    bad = tmp_path / "bad.csv"
    _write(bad, rows)
    args = [str(bad), "--labels", str(synthetic_root / "test_labels")]
    last_line_without_traceback(*finish(run(["-m", "submissions.score", *args])), str(bad), words)
    code, err = call(score_main, [*args, "--debug"], capsys=capsys)
    assert code == 2 and "Traceback" in err and str(bad) in err.strip().splitlines()[-1]
