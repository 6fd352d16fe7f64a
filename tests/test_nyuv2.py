"""NYUv2 importer: a tiny .mat in the official MATLAB v7.3 layout -> dataset root."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from kfold.data import nyuv2
from kfold.data.layout import DataError, open_root, read_depth, read_label, read_rgb

N, H, W = 6, 48, 64
SCENES = ["kitchen_0028", "kitchen_0028", "bedroom_0012", "bedroom_0012", "office_0003", "bathroom_0001"]
# Raw ids with their 13-class meaning checked by hand in map894_to_13.txt (0-based project ids):
# 0 unlabeled, 3 cabinet -> furniture, 4 ceiling, 5 chair, 11 floor.
RAW_TO_PROJECT = {0: 255, 3: 5, 4: 2, 5: 3, 11: 4}


def _frames():
    """Asymmetric per-frame content in (N, H, W) orientation."""
    rows, cols = np.mgrid[0:H, 0:W]
    rgb = np.zeros((N, H, W, 3), dtype=np.uint8)
    rgb[..., 0] = rows
    rgb[..., 1] = cols
    rgb[..., 2] = np.arange(N)[:, None, None] * 10
    depth_mm = (rows * 100 + cols)[None].repeat(N, 0) + np.arange(N)[:, None, None] * 7
    depth = depth_mm.astype(np.float32) / 1000 + np.float32(0.0004)  # rounds back to depth_mm
    depth[:, 0, 0] = np.nan
    depth[:, 0, 1] = 70.0  # beyond 65.535 m: saturates
    raws = np.array(list(RAW_TO_PROJECT))
    labels = raws[(rows // 12 + 2 * (cols // 32) + np.arange(N)[:, None, None]) % len(raws)].astype(np.uint16)
    return rgb, depth, depth_mm, labels


def write_mat(path: Path, rgb, depth, labels, scenes, drop: str | None = None) -> Path:
    """Write arrays the way MATLAB v7.3 does: axes reversed, cell arrays as object references."""
    with h5py.File(path, "w", userblock_size=512) as f:
        data = {"images": rgb.transpose(0, 3, 2, 1), "depths": depth.transpose(0, 2, 1),
                "labels": labels.transpose(0, 2, 1)}
        for key, value in data.items():
            if key != drop:
                f.create_dataset(key, data=value)
        refs = f.create_group("#refs#")
        cell = f.create_dataset("scenes", shape=(1, len(scenes)), dtype=h5py.ref_dtype)
        for i, name in enumerate(scenes):
            chars = refs.create_dataset(f"s{i}", data=np.array([[ord(c)] for c in name], dtype=np.uint16))
            chars.attrs["MATLAB_class"] = np.bytes_("char")
            cell[0, i] = chars.ref
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema")
    return path


@pytest.fixture
def meta(tmp_path: Path) -> Path:
    folder = tmp_path / "meta"
    folder.mkdir()
    shutil.copy(nyuv2.META_DIR / nyuv2.MAP_FILE, folder / nyuv2.MAP_FILE)
    (folder / nyuv2.TRAIN_INDEX_FILE).write_text("1\n3\n4\n6\n")
    (folder / nyuv2.TEST_INDEX_FILE).write_text("2\n5\n")
    return folder


@pytest.fixture
def frames():
    return _frames()


@pytest.fixture
def mat(tmp_path: Path, frames) -> Path:
    rgb, depth, _, labels = frames
    return write_mat(tmp_path / "nyu.mat", rgb, depth, labels, SCENES)


def test_standard_split(tmp_path: Path, mat: Path, meta: Path, frames) -> None:
    rgb, _, depth_mm, labels = frames
    out = tmp_path / "nyu"
    assert nyuv2.main([str(mat), "--out", str(out), "--meta", str(meta)]) == 0
    root = open_root(out)
    assert root.train_ids == ("0001", "0003", "0004", "0006")
    assert root.test_ids == ("0002", "0005")
    assert root.has_test_labels and root.image_size == (H, W)
    assert root.scenes == {"0001": "kitchen_0028", "0003": "bedroom_0012", "0004": "bedroom_0012",
                           "0006": "bathroom_0001"}
    with open(out / "scenes.csv", newline="") as fh:
        assert {r["id"]: r["scene"] for r in csv.DictReader(fh)}["0005"] == "office_0003"

    expected_label = np.vectorize(RAW_TO_PROJECT.get)(labels).astype(np.uint8)
    for split, ids in (("train", root.train_ids), ("test", root.test_ids)):
        for image_id in ids:
            i = int(image_id) - 1
            np.testing.assert_array_equal(read_rgb(root.image_path(split, image_id)), rgb[i])
            got_mm = np.rint(read_depth(root.depth_path(split, image_id)) * 1000).astype(np.int64)
            assert got_mm[0, 0] == 0 and got_mm[0, 1] == 65535
            np.testing.assert_array_equal(got_mm.ravel()[2:], depth_mm[i].ravel()[2:])
            label = read_label(root.label_path(split, image_id), root.num_classes)
            np.testing.assert_array_equal(label, expected_label[i])
    # Orientation spelled out: row index in red, column index in green.
    img = read_rgb(root.image_path("train", "0004"))
    assert tuple(img[47, 5]) == (47, 5, 30)


def test_all_train(tmp_path: Path, mat: Path, meta: Path) -> None:
    out = nyuv2.import_nyuv2(mat, tmp_path / "all", split="all-train", meta=meta, progress=False)
    root = open_root(out)
    assert root.train_ids == tuple(f"{i:04d}" for i in range(1, N + 1))
    assert root.test_ids == () and not (out / "test").exists() and not root.has_test_labels
    assert root.scenes["0005"] == "office_0003"


def test_real_mapping_file() -> None:
    path = nyuv2.META_DIR / nyuv2.MAP_FILE
    raw = np.loadtxt(path, dtype=np.int64)
    assert raw.shape == (895,) and raw.min() == 0 and raw.max() == 13
    assert set(range(14)) == set(raw.tolist())
    lut = nyuv2.read_label_map(path)
    assert lut.shape == (895,) and set(lut.tolist()) == set(range(13)) | {255}
    assert all(lut[k] == v for k, v in RAW_TO_PROJECT.items())


@pytest.mark.parametrize("drop", ["labels", "images"])
def test_missing_key(tmp_path: Path, meta: Path, frames, drop: str) -> None:
    rgb, depth, _, labels = frames
    mat = write_mat(tmp_path / "bad.mat", rgb, depth, labels, SCENES, drop=drop)
    with pytest.raises(DataError, match=rf"^{re.escape(str(mat))}: missing dataset '{drop}'"):
        nyuv2.import_nyuv2(mat, tmp_path / "out", meta=meta, progress=False)


def test_bad_shapes_and_values(tmp_path: Path, meta: Path, frames) -> None:
    rgb, depth, _, labels = frames
    mat = write_mat(tmp_path / "a.mat", rgb, depth[:, :, :-1], labels, SCENES)
    shape = re.escape("(6, 64, 48)")
    with pytest.raises(DataError, match=rf"^{re.escape(str(mat))}: key 'depths' must have shape {shape}"):
        nyuv2.import_nyuv2(mat, tmp_path / "out", meta=meta, progress=False)
    mat = write_mat(tmp_path / "b.mat", rgb, depth, labels, SCENES[:-1])
    with pytest.raises(DataError, match=rf"^{re.escape(str(mat))}: key 'scenes'"):
        nyuv2.import_nyuv2(mat, tmp_path / "out", meta=meta, progress=False)
    bad = labels.copy()
    bad[0, 0, 0] = 895
    mat = write_mat(tmp_path / "c.mat", rgb, depth, bad, SCENES)
    with pytest.raises(DataError, match=rf"^{re.escape(str(mat))}: key 'labels' frame 1 holds raw id 895"):
        nyuv2.import_nyuv2(mat, tmp_path / "out", meta=meta, progress=False)
    not_hdf5 = tmp_path / "v7.mat"
    not_hdf5.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(DataError, match=rf"^{re.escape(str(not_hdf5))}: not an HDF5 file"):
        nyuv2.import_nyuv2(not_hdf5, tmp_path / "out", meta=meta, progress=False)


def test_bad_meta_and_out(tmp_path: Path, mat: Path, meta: Path) -> None:
    (meta / nyuv2.TEST_INDEX_FILE).write_text("2\n7\n")
    with pytest.raises(DataError, match=r"test_idx.txt: frame numbers must lie in 1..6"):
        nyuv2.import_nyuv2(mat, tmp_path / "out", meta=meta, progress=False)
    (meta / nyuv2.TEST_INDEX_FILE).write_text("2\n3\n")
    with pytest.raises(DataError, match=r"test_idx.txt: frames also listed in train_idx.txt"):
        nyuv2.import_nyuv2(mat, tmp_path / "out", meta=meta, progress=False)
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("")
    with pytest.raises(DataError, match=rf"^{re.escape(str(used))}: output folder is not empty"):
        nyuv2.import_nyuv2(mat, used, meta=meta, progress=False)


def test_meta_files_ship_inside_the_package() -> None:
    """The importer needs nothing outside the repository: the mapping and split files are package data."""
    repo = Path(__file__).resolve().parents[1]
    assert nyuv2.META_DIR.is_relative_to(repo / "kfold")
    assert len(nyuv2.read_label_map(nyuv2.META_DIR / nyuv2.MAP_FILE)) == 895
    assert len(nyuv2.read_frame_index(nyuv2.META_DIR / nyuv2.TRAIN_INDEX_FILE, 1449)) == 795
    assert len(nyuv2.read_frame_index(nyuv2.META_DIR / nyuv2.TEST_INDEX_FILE, 1449)) == 654
    assert "shared" not in nyuv2.META_DIR.relative_to(repo).parts
