"""Tests of the embedded synthetic dataset generator (tiny images, a few rooms)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from kfold.data import synthetic
from kfold.data.layout import DEFAULT_CLASSES, IGNORE_INDEX, open_root, read_depth, read_label
from kfold.data.synthetic import writer

SIZE = (48, 64)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "root", 8, 4, SIZE, seed=0, progress=False)


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """48 train images (12 rooms) for statistics; returns the root and the 256-bin label histogram."""
    out = tmp_path_factory.mktemp("many") / "root"
    counts = writer._generate(out, 48, 0, SIZE, 1, 4, False)
    return out, counts


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_valid(root):
    data = open_root(root, verify=True)
    assert data.classes == DEFAULT_CLASSES
    assert data.image_size == SIZE
    assert len(data.train_ids) == 8 and len(data.test_ids) == 4
    assert data.has_test_labels
    assert set(data.train_ids).isdisjoint(data.test_ids)
    assert all(data.label_path("test", i).exists() for i in data.test_ids)
    assert not any(p.name.endswith(".tmp") for p in root.rglob("*"))  # atomic writes left no temporaries


def test_scenes_cover_every_id_and_rooms_never_straddle_splits(root):
    data = open_root(root)
    with open(root / "scenes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [row["id"] for row in rows]
    assert sorted(ids) == sorted(data.train_ids + data.test_ids) and len(ids) == len(set(ids))
    scene = {row["id"]: row["scene"] for row in rows}
    train_rooms = {scene[i] for i in data.train_ids}
    test_rooms = {scene[i] for i in data.test_ids}
    assert train_rooms.isdisjoint(test_rooms)
    assert len(train_rooms) == 2 and len(test_rooms) == 1  # 4 views per room
    assert all(scene[i] == "room" + i[1:5] for i in ids)  # ids like r0007_v2 belong to room0007
    assert data.scenes == {i: scene[i] for i in data.train_ids}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(root, tmp_path):
    again = synthetic.generate(tmp_path / "again", 8, 4, SIZE, seed=0, progress=False)
    assert _files(again) == _files(root)
    other = _files(synthetic.generate(tmp_path / "other", 8, 4, SIZE, seed=1, progress=False))
    image = "train/images/r0000_v0.png"
    assert other[image] != _files(root)[image]


def test_depth_is_mostly_valid_with_holes(many):
    out, _ = many
    depths = [read_depth(p) for p in sorted((out / "train" / "depths").glob("*.png"))]
    stack = np.stack(depths)
    valid = stack > 0
    assert 0.005 < 1 - valid.mean() < 0.3  # holes exist but are a minority
    assert sum(bool((d == 0).any()) for d in depths) > len(depths) // 2
    assert stack[valid].min() >= 0.5 and stack[valid].max() <= 10.0  # metres, Kinect range
    assert 1.0 < np.median(stack[valid]) < 6.0


def test_labels_in_range_with_a_little_ignore(root, many):
    data = open_root(root)
    for split, ids in (("train", data.train_ids), ("test", data.test_ids)):
        for i in ids:
            label = read_label(data.label_path(split, i), data.num_classes)
            assert label.shape == SIZE
            assert np.all((label < len(DEFAULT_CLASSES)) | (label == IGNORE_INDEX))
    _, counts = many
    assert counts[len(DEFAULT_CLASSES) : IGNORE_INDEX].sum() == 0
    assert 0.01 < counts[IGNORE_INDEX] / counts.sum() < 0.12


def test_class_shares_are_long_tailed(many):
    out, counts = many
    shares = counts[: len(DEFAULT_CLASSES)] / counts.sum()
    top3 = [DEFAULT_CLASSES[i] for i in np.argsort(shares)[::-1][:3]]
    assert "wall" in top3, top3
    share = dict(zip(DEFAULT_CLASSES, shares, strict=True))
    assert share["wall"] > 0.15 and share["floor"] > 0.04 and share["furniture"] > 0.04
    for rare in ("books", "tv"):
        assert 0 < share[rare] < 0.03, (rare, share[rare])
    labels = [read_label(p, len(DEFAULT_CLASSES)) for p in sorted((out / "train" / "labels").glob("*.png"))]
    assert sum(bool((lab == DEFAULT_CLASSES.index("books")).any()) for lab in labels) >= 4
    assert sum(bool((lab == DEFAULT_CLASSES.index("tv")).any()) for lab in labels) >= 1
    assert (shares > 0).sum() >= 12  # nearly every class shows up in 48 images


def test_views_have_consistent_structure():
    # floor below, ceiling above: in a level view the floor sits low in the image and the ceiling high
    rng = np.random.default_rng(0)
    rows_floor, rows_ceiling = [], []
    for room_index in range(6):
        room = synthetic.build_room(np.random.default_rng([0, room_index]))
        rgb, depth, label, teacher = synthetic.render_view(rng, room, SIZE)
        assert rgb.shape == (*SIZE, 3) and rgb.dtype == np.uint8
        assert depth.shape == SIZE and depth.dtype == np.uint16
        assert label.shape == SIZE and label.dtype == np.uint8
        # the teacher is dense where the sensor has holes, and within its +-3 % of the sensor elsewhere
        assert teacher.shape == SIZE and teacher.dtype == np.uint16 and (teacher > 0).all()
        seen = (depth > 0) & (depth < 5000)
        ratio = teacher[seen].astype(np.float64) / depth[seen]
        assert 0.9 < np.median(ratio) < 1.1 and (depth == 0).any()
        for cls, rows in (("floor", rows_floor), ("ceiling", rows_ceiling)):
            r, _ = np.nonzero(label == DEFAULT_CLASSES.index(cls))
            rows.extend(r.tolist())
    assert np.mean(rows_floor) > SIZE[0] / 2
    assert not rows_ceiling or np.mean(rows_ceiling) < SIZE[0] / 2


def test_cli_prints_class_shares(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "cli"), "--train", "4", "--test", "4", "--size", "48x64"])
    printed = capsys.readouterr().out
    for name in DEFAULT_CLASSES:
        assert name in printed
    assert "images/s" in printed
    assert len(open_root(tmp_path / "cli").test_ids) == 4


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "x"), "--size", "48by64"])
    with pytest.raises(ValueError, match="--train 0: must be at least 1"):
        synthetic.generate(tmp_path / "y", 0, 1, SIZE, seed=0)
