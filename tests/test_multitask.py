"""Any dataset: class maps, teacher / hybrid depth targets, RGB-only roots, both berHu readings, exp096_1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from foldwise.classmap import SHIPPED_DIR, read_class_map
from kfold.data.dataset import SegmentationDataset
from kfold.data.layout import DEFAULT_CLASSES, open_root
from kfold.losses import berhu_loss

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)


# ------------------------------------------------------------------------------------------------- class maps
def test_shipped_maps_merge_every_nyu_class_once() -> None:
    six = read_class_map("nyu13_to_6", DEFAULT_CLASSES)
    assert six.classes == ("floor", "structure", "window", "solid_furniture", "legged_furniture", "objects")
    lut = six.lut
    expect = {"floor": 0, "wall": 1, "ceiling": 1, "picture": 1, "window": 2, "bed": 3, "sofa": 3, "furniture": 3,
              "chair": 4, "table": 4, "objects": 5, "books": 5, "tv": 5}
    assert {name: int(lut[i]) for i, name in enumerate(DEFAULT_CLASSES)} == expect
    assert lut[255] == 255
    two = read_class_map(SHIPPED_DIR / "nyu13_to_2_floor.yaml", DEFAULT_CLASSES)
    assert two.classes == ("floor", "not_floor") and set(two.lut[:13].tolist()) == {0, 1}


@pytest.mark.parametrize("text, words", [
    ("floor: [floor, carpet]\n", "'carpet', which is not a class of the root"),
    ("a: [floor]\nb: [floor]\n", "'floor' is merged into both 'a' and 'b'"),
    ("a: []\n", "needs a non-empty list"),
    ("- floor\n", "expected a mapping"),
    ("a: [floor\n", "not valid YAML"),
])
def test_a_bad_class_map_is_one_line_naming_the_file(tmp_path, text, words) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=str(path)) as err:
        read_class_map(path, DEFAULT_CLASSES)
    assert words in str(err.value)


def test_unlisted_classes_become_ignore(synthetic_root, tmp_path) -> None:
    path = tmp_path / "floor_wall.yaml"
    path.write_text("floor: [floor]\nwall: [wall, picture]\n")
    root = open_root(synthetic_root, verify=False, class_map=path)
    raw = open_root(synthetic_root, verify=False)
    assert root.classes == ("floor", "wall") and root.source_classes == DEFAULT_CLASSES
    image_id = root.train_ids[0]
    merged, original = root.label("train", image_id), raw.label("train", image_id)
    floor, wall, picture = (DEFAULT_CLASSES.index(c) for c in ("floor", "wall", "picture"))
    np.testing.assert_array_equal(merged == 0, original == floor)
    np.testing.assert_array_equal(merged == 1, (original == wall) | (original == picture))
    assert set(np.unique(merged).tolist()) <= {0, 1, 255}


# ------------------------------------------------------------------------------------------------ depth targets
def test_hybrid_takes_the_teacher_where_it_has_a_reading(synthetic_root, tmp_path) -> None:
    root_path = Path(shutil.copytree(synthetic_root, tmp_path / "root"))
    root = open_root(root_path)
    image_id = root.train_ids[0]
    teacher = np.full(root.image_size, 2.5, dtype=np.float32)
    teacher[:, :10] = 0.0  # no teacher reading in the left columns: the sensor is kept there
    (root_path / "train" / "teacher_depths" / f"{image_id}.png").unlink()
    np.save(root_path / "train" / "teacher_depths" / f"{image_id}.npy", teacher)
    root = open_root(root_path)
    items = {target: SegmentationDataset(root, "train", [image_id], None, depth_target=target)[0]["depth"][0].numpy()
             for target in ("sensor", "teacher", "hybrid")}
    np.testing.assert_array_equal(items["teacher"], teacher)
    np.testing.assert_array_equal(items["hybrid"][:, 10:], 2.5)
    np.testing.assert_array_equal(items["hybrid"][:, :10], items["sensor"][:, :10])
    four = SegmentationDataset(root, "train", [image_id], None, in_channels=4, depth_target="teacher")[0]
    sensor4 = SegmentationDataset(root, "train", [image_id], None, in_channels=4)[0]
    torch.testing.assert_close(four["image"], sensor4["image"])  # the input channel stays the sensor's


def test_berhu_both_readings_of_the_threshold() -> None:
    target = torch.tensor([[[[1.0, 2.0, 3.0, 4.0, 0.0]]]])
    pred = torch.tensor([[[[1.1, 2.4, 3.0, 7.0, 9.0]]]])  # errors 0.1, 0.4, 0.0, 3.0 (last pixel: no reading)
    err = torch.tensor([0.1, 0.4, 0.0, 3.0])

    def manual(c: float) -> float:
        return float(torch.where(err <= c, err, (err**2 + c**2) / (2 * c)).mean())

    assert berhu_loss(pred, target, 0.2, "max_fraction").item() == pytest.approx(manual(0.2 * 3.0))
    # 80th percentile of 4 errors: the ceil(0.8 * 4) = 4th smallest = 3.0; the 50th: the 2nd smallest = 0.1
    assert berhu_loss(pred, target, 0.8, "percentile").item() == pytest.approx(manual(3.0))
    assert berhu_loss(pred, target, 0.5, "percentile").item() == pytest.approx(manual(0.1))


# ------------------------------------------------------------------------------------------ through the CLI
def _experiment(name: str, root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(f"experiments/{name}.py", "--preset", "smoke", "--data-root", str(root), "--out", str(out), *extra)


def test_teacher_target_without_a_teacher_folder_is_one_line(synthetic_root, tmp_path) -> None:
    root = Path(shutil.copytree(synthetic_root, tmp_path / "root"))
    shutil.rmtree(root / "train" / "teacher_depths")
    proc = _experiment("exp093_2", root, tmp_path / "runs", "--fold", "0", "--opts", "loss.depth_target", "hybrid")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(root / "train" / "teacher_depths") in lines[0] and "missing folder" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_an_rgb_only_root_trains_rgb_and_refuses_rgbd(synthetic_root, tmp_path) -> None:
    root = Path(shutil.copytree(synthetic_root, tmp_path / "root"))
    for split in ("train", "test"):
        shutil.rmtree(root / split / "depths")
    rgbd = _experiment("exp093_5", root, tmp_path / "runs", "--fold", "0")
    lines = rgbd.stderr.strip().splitlines()
    assert rgbd.returncode == 2 and len(lines) == 1 and str(root / "train" / "depths") in lines[0], rgbd.stderr
    rgb = _experiment("exp093_2", root, tmp_path / "runs", "--fold", "0")
    assert rgb.returncode == 0, rgb.stderr
    log = (tmp_path / "runs" / "exp093_2" / "fold0" / "train.log").read_text()
    assert "(an RGB-only root): depth head, depth loss, Kendall weighting and smoothness are off" in log
    manifest = json.loads((tmp_path / "runs" / "exp093_2" / "fold0" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["oof_depth"] is None


def _decode(rle: str, size: int) -> np.ndarray:
    """An RLE decoder written here, independent of submissions.rle: 1-indexed start length pairs, C order."""
    mask = np.zeros(size, bool)
    values = [int(v) for v in str(rle).split()] if isinstance(rle, str) else []
    for start, length in zip(values[::2], values[1::2]):
        mask[start - 1 : start - 1 + length] = True
    return mask


def test_exp096_1_smoke_six_classes_end_to_end(synthetic_root, tmp_path) -> None:
    out, subs = tmp_path / "runs", tmp_path / "subs"
    proc = _experiment("exp096_1", synthetic_root, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "depth (metres, vs the sensor, mean of folds): RMSE" in proc.stdout
    six = read_class_map("nyu13_to_6", DEFAULT_CLASSES).classes
    for k in range(5):
        manifest = json.loads((out / "exp096_1" / f"fold{k}" / "manifest.json").read_text())
        assert manifest["classes"] == list(six) and manifest["oof"]["shape"][1] == 6
        assert manifest["class_map"]["groups"]["structure"] == ["wall", "ceiling", "picture"]
        assert np.load(out / "exp096_1" / f"fold{k}" / "test.npy", mmap_mode="r").shape[1] == 6
    recipe = yaml.safe_load((out / "exp096_1" / "fold0" / "config.yaml").read_text())["recipe"]
    assert recipe["model"]["encoder"] == "tu-mobilenetv3_small_100" and recipe["loss"]["depth_target"] == "hybrid"
    row = json.loads((out / "exp096_1" / "leaderboard_row.json").read_text())
    assert row["depth_rmse"] > 0 and 0 <= row["depth_delta1"] <= 1

    blend = run("ensemble/blend.py", "--runs-dir", str(out), "--runs", "exp096_1", "--out-dir", str(subs),
                "--name", "six", "--workers", "1")
    assert blend.returncode == 0, blend.stderr[-3000:]
    record = json.loads((subs / "six.json").read_text())
    sub = pd.read_csv(subs / "six.csv")
    assert sorted(sub["ClassId"].unique().tolist()) == list(range(6))

    # an independent scorer: merge the raw test labels with the YAML read here, decode the CSV here
    groups = yaml.safe_load((SHIPPED_DIR / "nyu13_to_6.yaml").read_text())
    merge = np.full(256, 255, np.uint8)
    for new_id, olds in enumerate(groups.values()):
        for old in olds:
            merge[DEFAULT_CLASSES.index(old)] = new_id
    cm = np.zeros((6, 7), np.int64)
    for image_id, rows in sub.groupby("ImageId"):
        label = merge[np.array(Image.open(synthetic_root / "test_labels" / f"{image_id}.png"))]
        pred = np.full(label.size, 6)
        for class_id, rle in zip(rows["ClassId"], rows["EncodedPixels"]):
            pred[_decode(rle, label.size)] = class_id
        keep = label.ravel() != 255
        np.add.at(cm, (label.ravel()[keep], pred[keep]), 1)
    tp = np.diag(cm[:, :6]).astype(float)
    union = cm.sum(1) + cm[:, :6].sum(0) - tp
    miou = float(np.mean(tp[union > 0] / union[union > 0]))
    assert record["test"]["miou"] == pytest.approx(miou, abs=1e-12)
    scored = run("-m", "submissions.score", str(subs / "six.csv"), "--labels", str(synthetic_root / "test_labels"),
                 "--class-map", "nyu13_to_6")
    assert scored.returncode == 0 and f"mIoU            {miou:.4f}" in scored.stdout, scored.stdout + scored.stderr
