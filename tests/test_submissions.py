"""Tests of the submissions package: RLE, writer, validator, scorer (function and CLI), leaderboard."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from submissions.common import SubmissionError
from submissions.leaderboard import (
    main as leaderboard_main,
)
from submissions.leaderboard import (
    read_leaderboard,
    record_public_lb,
    upsert_leaderboard,
)
from submissions.rle import encode_class_map, rle_decode, rle_encode
from submissions.score import main as score_main
from submissions.score import score_submission
from submissions.validate import read_submission, validate_submission
from submissions.writer import write_submission

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 13
SHAPE = (7, 13)  # odd sizes catch row/column mix-ups
IDS = ("img0", "img1", "img2")


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Label PNGs (with a few ignored pixels) and the matching class maps."""
    rng = np.random.default_rng(0)
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    preds = {}
    for image_id in IDS:
        label = rng.integers(0, NUM_CLASSES, SHAPE).astype(np.uint8)
        label[rng.random(SHAPE) < 0.1] = 255
        Image.fromarray(label).save(labels_dir / f"{image_id}.png")
        preds[image_id] = np.where(label == 255, 0, label).astype(np.uint8)
    return labels_dir, preds


@pytest.fixture()
def good_csv(tmp_path: Path, dataset) -> Path:
    path = tmp_path / "sub.csv"
    write_submission(path, iter(dataset[1].items()), NUM_CLASSES)
    return path


# --- RLE ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (31, 17), (1, 9), (9, 1)])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_rle_round_trip(shape, order, density):
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) < density
    rle = rle_encode(mask, order)
    decoded = rle_decode(rle, shape, order)
    assert decoded.dtype == bool and decoded.shape == shape
    np.testing.assert_array_equal(decoded, mask)
    assert (rle == "") == (not mask.any())


def test_rle_known_example():
    mask = np.array([[0, 1, 1], [1, 0, 1]], dtype=bool)
    # Row-major pixels 1..6: 0 1 1 | 1 0 1 ; column-major: 0 1 | 1 0 | 1 1.
    assert rle_encode(mask, "C") == "2 3 6 1"
    assert rle_encode(mask, "F") == "2 2 5 2"
    np.testing.assert_array_equal(rle_decode("2 3 6 1", (2, 3), "C"), mask)
    np.testing.assert_array_equal(rle_decode("2 2 5 2", (2, 3), "F"), mask)
    assert rle_encode(np.ones((1, 1), bool)) == "1 1"
    assert rle_encode(np.zeros((4, 5), bool)) == ""
    # Touching runs are unambiguous and decode fine.
    np.testing.assert_array_equal(rle_decode("1 2 3 1", (1, 4)), [[1, 1, 1, 0]])


@pytest.mark.parametrize("order", ["C", "F"])
def test_encode_class_map_equals_per_class_encode(order):
    class_map = np.random.default_rng(1).integers(0, 5, (31, 17)).astype(np.uint8)
    class_map[:10] = 2  # long runs too
    expected = [rle_encode(class_map == c, order) for c in range(6)]
    assert encode_class_map(class_map, 6, order) == expected
    assert expected[5] == ""


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", "odd number of values (3)"),
        ("1 x", "'x' is not an integer"),
        ("1.0 2", "'1.0' is not an integer"),
        ("0 2", "start 0 is < 1"),
        ("5 3", "ends at pixel 7, past the last pixel 6"),
        ("1 2 2 1", "overlap or are unsorted"),
        ("4 1 1 1", "overlap or are unsorted"),
        ("2 0", "length 0"),
        ("2 -1", "length -1"),
    ],
)
def test_rle_decode_errors(rle, message):
    with pytest.raises(SubmissionError) as info:
        rle_decode(rle, (2, 3))
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


# --- writer ------------------------------------------------------------------------------------------


def test_writer_default_format(tmp_path):
    path = tmp_path / "sub.csv"
    preds = [("b", np.array([[0, 2], [2, 2]], np.uint8)), ("a", np.array([[1, 1], [0, 1]], np.uint8))]
    summary = write_submission(path, iter(preds), num_classes=3)
    assert path.read_text() == (
        "ImageId,ClassId,EncodedPixels\n"
        "a,0,3 1\na,1,1 2 4 1\na,2,\n"
        "b,0,1 1\nb,1,\nb,2,2 3\n"
    )
    assert summary.written and summary.n_images == 2 and summary.n_rows == 6
    assert summary.image_shape == (2, 2) and summary.class_pixels == (2, 3, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]  # no temporary file left


def test_writer_follows_sample_submission(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("Id,Label,Pixels,Usage\nb,2,1 1,Public\na,1,1 1,Private\nb,0,,Public\n")
    preds = {"a": np.array([[1, 1], [0, 1]], np.uint8), "b": np.array([[0, 2], [2, 2]], np.uint8)}
    path = tmp_path / "sub.csv"
    summary = write_submission(path, preds.items(), 3, sample_submission=sample)
    assert path.read_text() == "Id,Label,Pixels,Usage\nb,2,2 3,Public\na,1,1 2 4 1,Private\nb,0,1 1,Public\n"
    assert summary.columns == ("Id", "Label", "Pixels", "Usage") and summary.n_rows == 3

    preds["c"] = preds["a"]
    with pytest.raises(SubmissionError, match=r"predicted id\(s\) are not in the sample: c"):
        write_submission(path, preds.items(), 3, sample_submission=sample)
    with pytest.raises(SubmissionError, match=r"sample id\(s\) have no prediction: b"):
        write_submission(path, [("a", preds["a"])], 3, sample_submission=sample)


def test_writer_validates_before_writing(tmp_path):
    path = tmp_path / "sub.csv"
    good = [("a", np.zeros((2, 2), np.uint8)), ("b", np.ones((2, 2), np.uint8))]
    write_submission(path, good, 3)
    before = path.read_bytes()

    with pytest.raises(SubmissionError, match=r"1 expected id\(s\) have no rows: c"):
        write_submission(path, good, 3, expected_ids=["a", "b", "c"])
    with pytest.raises(SubmissionError, match=r"unknown id\(s\): b"):
        write_submission(path, good, 3, expected_ids=["a"])
    with pytest.raises(SubmissionError, match=r"'a' has class id 3 outside \[0, 3\)"):
        write_submission(path, [("a", np.full((2, 2), 3, np.uint8))], 3)
    with pytest.raises(SubmissionError, match="'a' predicted twice"):
        write_submission(path, good + good[:1], 3)
    with pytest.raises(SubmissionError, match="integer class ids"):
        write_submission(path, [("a", np.zeros((2, 2), np.float32))], 3)

    def crashing():
        yield good[0]
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        write_submission(tmp_path / "new.csv", crashing(), 3)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]

    summary = write_submission(tmp_path / "dry.csv", good, 3, dry_run=True)
    assert not summary.written and summary.n_rows == 6 and not (tmp_path / "dry.csv").exists()


def test_validate_submission(good_csv, dataset):
    shapes = dict.fromkeys(IDS, SHAPE)
    df = read_submission(good_csv)
    validate_submission(df, shapes, NUM_CLASSES)
    with pytest.raises(SubmissionError, match="past the last pixel"):
        validate_submission(df, {i: (3, 3) for i in IDS}, NUM_CLASSES)
    assert df.loc[0, "EncodedPixels"] and df.loc[1, "ClassId"] == "1"
    df.loc[1, "EncodedPixels"] = df.loc[0, "EncodedPixels"]  # class 1 of img0 copies class 0
    overlap = r"image 'img0': pixel \d+ \(order C\) is claimed by classes 0, 1"
    with pytest.raises(SubmissionError, match=overlap):
        validate_submission(df, shapes, NUM_CLASSES)


def test_read_submission_lines_and_pandas_frames(tmp_path, good_csv):
    lines = good_csv.read_text().splitlines()
    lines.insert(3, "")  # a blank line is skipped but still counted
    lines[5] = "img0,3,1 2 3"  # file line 6
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("\n".join(lines) + "\n")
    shapes = dict.fromkeys(IDS, SHAPE)
    with pytest.raises(SubmissionError, match=r"spaced.csv: line 6 \(img0, class 3\): RLE has an odd number"):
        validate_submission(read_submission(spaced), shapes, NUM_CLASSES, source=str(spaced))
    # A frame read by pandas (int class ids, nan for empty cells) validates too.
    validate_submission(pd.read_csv(good_csv), shapes, NUM_CLASSES)


# --- scorer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["C", "F"])
def test_true_labels_score_one(tmp_path, dataset, order):
    labels_dir, preds = dataset
    path = tmp_path / f"sub_{order}.csv"
    write_submission(path, preds.items(), NUM_CLASSES, order=order, expected_ids=IDS)
    scores = score_submission(path, labels_dir, NUM_CLASSES, order=order)
    assert scores["miou"] == 1.0 and scores["pixel_acc"] == 1.0
    ignored = sum(int((np.asarray(Image.open(labels_dir / f"{i}.png")) == 255).sum()) for i in IDS)
    assert ignored > 0 and scores["n_images"] == 3
    assert scores["n_pixels"] == 3 * SHAPE[0] * SHAPE[1] - ignored
    if order == "F":  # the wrong order scrambles pixels: the score must drop
        assert score_submission(path, labels_dir, NUM_CLASSES, order="C")["miou"] < 0.5


def test_score_hand_example_and_unclaimed_pixels(tmp_path):
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    Image.fromarray(np.array([[0, 0, 1, 255]], np.uint8)).save(labels_dir / "x.png")
    sub = tmp_path / "sub.csv"
    sub.write_text("ImageId,ClassId,EncodedPixels\nx,0,1 1\nx,1,2 3\nx,2,\n")
    scores = score_submission(sub, labels_dir, 3)  # prediction 0 1 1 1, last pixel ignored
    np.testing.assert_allclose(scores["iou"], [0.5, 0.5, np.nan])
    assert scores["miou"] == 0.5 and scores["pixel_acc"] == pytest.approx(2 / 3)
    sub.write_text("ImageId,ClassId,EncodedPixels\nx,0,1 1\nx,1,\nx,2,\n")
    scores = score_submission(sub, labels_dir, 3)  # prediction 0 none none none
    np.testing.assert_allclose(scores["iou"], [0.5, 0.0, np.nan])
    assert scores["miou"] == 0.25 and scores["pixel_acc"] == pytest.approx(1 / 3)


def test_score_cli_true_labels(good_csv, dataset):
    result = run_module("submissions.score", str(good_csv), "--labels", str(dataset[0]))
    assert result.returncode == 0, result.stderr
    assert "mIoU            1.0000" in result.stdout
    assert "   12 window     1.0000" in result.stdout


def _edit(lines: list[str], case: str) -> list[str]:
    header, rows = lines[0], lines[1:]
    if case == "odd_rle":
        rows[0] = "img0,0,1 2 3"
    elif case == "non_integer":
        rows[0] = "img0,0,1 two"
    elif case == "zero_length":
        rows[0] = "img0,0,5 0"
    elif case == "out_of_bounds":
        rows[0] = "img0,0,90 5"
    elif case == "unknown_id":
        rows.append("ghost,0,")
    elif case == "missing_id":
        rows = [r for r in rows if not r.startswith("img1,")]
    elif case == "duplicate":
        rows.insert(1, rows[0])
    elif case == "bad_class":
        rows.append("img0,13,")
    elif case == "missing_column":
        header, rows = "ImageId,EncodedPixels", [",".join(r.split(",")[::2]) for r in rows]
    elif case == "overlap":
        rows = [f"img0,{c}," if r.startswith("img0,") else r for c, r in enumerate(rows)]
        rows[0], rows[1] = "img0,0,1 5", "img0,1,3 2"
    elif case == "ragged":
        rows[0] += ",extra,field"
    elif case == "empty":
        return []
    return [header, *rows]


MALFORMED = {
    "odd_rle": "line 2 (img0, class 0): RLE has an odd number of values (3)",
    "non_integer": "line 2 (img0, class 0): RLE value 'two' is not an integer",
    "zero_length": "line 2 (img0, class 0): RLE run at start 5 has length 0",
    "out_of_bounds": "line 2 (img0, class 0): RLE run 90 5 ends at pixel 94, past the last pixel 91",
    "unknown_id": "unknown ImageId 'ghost'",
    "missing_id": "1 expected id(s) have no rows: img1",
    "duplicate": "line 3: duplicate row for ImageId 'img0' ClassId 0 (first on line 2)",
    "bad_class": "ClassId 13 outside [0, 13)",
    "missing_column": "missing column(s) ClassId",
    "overlap": "image 'img0': pixel 3 (order C) is claimed by classes 0, 1",
    "ragged": "not a readable CSV: line 2 has 5 fields, the header has 3",
    "empty": "empty file",
}


def _check_malformed(bad: Path, case: str, returncode: int, out: str, err: str) -> None:
    assert returncode == 2 and out == ""
    message = err.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"error: {bad}") and MALFORMED[case] in message


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_score_cli_malformed(tmp_path, good_csv, dataset, case, capsys):
    bad = tmp_path / f"bad_{case}.csv"
    bad.write_text("".join(line + "\n" for line in _edit(good_csv.read_text().splitlines(), case)))
    # In-process main() keeps the suite fast; one case also goes through a real subprocess.
    code = score_main([str(bad), "--labels", str(dataset[0])])
    captured = capsys.readouterr()
    _check_malformed(bad, case, code, captured.out, captured.err)
    if case == "overlap":
        result = run_module("submissions.score", str(bad), "--labels", str(dataset[0]))
        _check_malformed(bad, case, result.returncode, result.stdout, result.stderr)


def test_score_cli_debug_and_class_names(tmp_path, good_csv, dataset, capsys):
    labels_dir = dataset[0]
    bad = tmp_path / "bad.csv"
    bad.write_text(good_csv.read_text().replace("img0,0,", "img0,0,7 ", 1))
    assert score_main([str(bad), "--labels", str(labels_dir), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err

    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(NUM_CLASSES)) + "\n")
    assert score_main([str(good_csv), "--labels", str(labels_dir), "--classes", str(names)]) == 0
    assert "12 c12" in capsys.readouterr().out
    # With too few classes the CSV's class ids are out of range.
    assert score_main([str(good_csv), "--labels", str(labels_dir), "--num-classes", "2"]) == 2
    assert "ClassId" in capsys.readouterr().err


# --- leaderboard -------------------------------------------------------------------------------------


def test_leaderboard_upsert_keeps_public_lb(tmp_path, capsys):
    path = tmp_path / "lb.csv"
    upsert_leaderboard(
        {"name": "exp1", "kind": "experiment", "members": ["exp1"], "oof_miou": 0.50,
         "oof_miou_nested": 0.48, "pixel_acc": 0.8, "iou_bed": 0.3, "submission": "s1.csv"}, path)
    upsert_leaderboard(
        {"name": "blend1", "kind": "blend", "members": ["exp1", "exp2"], "weights": [0.25, 0.75],
         "temperatures": {"exp1": 1.0, "exp2": 0.9}, "oof_miou": 0.60, "oof_miou_nested": 0.55,
         "iou_wall": np.float32(0.5)}, path)
    record_public_lb("exp1", 0.47, path)
    upsert_leaderboard(
        {"name": "exp1", "kind": "experiment", "oof_miou": 0.52, "oof_miou_nested": 0.50}, path
    )

    df = read_leaderboard(path)
    assert df["name"].tolist() == ["exp1", "blend1"]  # replaced in place
    exp1 = df.set_index("name").loc["exp1"]
    assert exp1["public_lb"] == 0.47 and exp1["oof_miou"] == 0.52 and np.isnan(exp1["iou_bed"])
    blend = df.set_index("name").loc["blend1"]
    assert blend["weights"] == "[0.25, 0.75]" and blend["iou_wall"] == 0.5 and np.isnan(blend["public_lb"])
    assert list(df.columns[-5:]) == ["submission", "created", "notes", "trackers", "public_lb"]
    assert {"iou_bed", "iou_wall"} <= set(df.columns)

    upsert_leaderboard({"name": "exp1", "kind": "experiment", "public_lb": 0.49}, path)
    assert read_leaderboard(path).set_index("name").loc["exp1", "public_lb"] == 0.49

    # --runs-dir: an empty folder, not the repository's runs/ (a user's make demo leaves experiments there)
    assert leaderboard_main(["--path", str(path), "--runs-dir", str(tmp_path / "no_runs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[0] == "blend1" and out[2].split()[0] == "exp1"  # ranked by nested mIoU
    assert leaderboard_main(["--path", str(path), "--record-lb", "nope", "0.5"]) == 2
    assert "no leaderboard row named 'nope'" in capsys.readouterr().err

    with pytest.raises(SubmissionError, match="unknown column"):
        upsert_leaderboard({"name": "x", "kind": "blend", "oof_mIoU": 0.1}, path)
    with pytest.raises(SubmissionError, match="kind must be one of"):
        upsert_leaderboard({"name": "x", "kind": "fold"}, path)


def _upsert_many(args: tuple[str, int]) -> None:
    path, worker = args
    for i in range(5):
        upsert_leaderboard({"name": f"w{worker}_{i}", "kind": "experiment", "oof_miou": i / 10}, path)


def test_leaderboard_concurrent_upserts(tmp_path):
    path = str(tmp_path / "lb.csv")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_upsert_many, [(path, w) for w in range(4)])
    with open(path, newline="") as f:
        names = sorted(row["name"] for row in csv.DictReader(f))
    assert names == sorted(f"w{w}_{i}" for w in range(4) for i in range(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lb.csv", "lb.csv.lock"]


# --- import hygiene ----------------------------------------------------------------------------------


def test_submissions_imports_no_torch():
    code = (
        "import sys, pkgutil, importlib, submissions\n"
        "for m in pkgutil.iter_modules(submissions.__path__):\n"
        "    importlib.import_module('submissions.' + m.name)\n"
        "bad = [m for m in ('torch', 'kfold', 'tta', 'ensemble') if m in sys.modules]\n"
        "assert len(sys.modules) and 'submissions.score' in sys.modules, sorted(sys.modules)\n"
        "print('forbidden:', bad)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "forbidden: []"


def test_read_leaderboard_missing_file_is_empty(tmp_path):
    df = read_leaderboard(tmp_path / "none.csv")
    assert isinstance(df, pd.DataFrame) and df.empty and "public_lb" in df.columns


def test_leaderboard_picks_up_experiment_reports(tmp_path):
    from submissions.leaderboard import main as leaderboard_main
    from submissions.leaderboard import read_leaderboard as read_board

    (tmp_path / "runs" / "exp1").mkdir(parents=True)
    row = {"name": "exp1", "kind": "experiment", "members": "exp1", "oof_miou": 0.5, "oof_miou_nested": 0.5}
    (tmp_path / "runs" / "exp1" / "leaderboard_row.json").write_text(json.dumps(row))
    board = tmp_path / "leaderboard.csv"
    assert leaderboard_main(["--path", str(board), "--runs-dir", str(tmp_path / "runs")]) == 0
    assert list(read_board(board)["name"]) == ["exp1"]
