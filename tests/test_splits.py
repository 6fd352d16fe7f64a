"""Scene-grouped, class-stratified folds: assignment, determinism, concurrency and validation."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from foldwise.io import write_png, write_text
from kfold import splits
from kfold.data.layout import DataError, DataRoot, open_root

H, W = 48, 64
TV, BOOKS, FLOOR, WALL, FURNITURE = 10, 1, 4, 11, 5


def make_root(path: Path, n_scenes: int = 10, views: int = 3, n_test: int = 2) -> Path:
    """A tiny root: ``n_scenes`` scenes of ``views`` frames; tv in one frame of every even scene."""
    rng = np.random.default_rng(0)
    rows = ["id,scene"]
    for s in range(n_scenes):
        for v in range(views):
            image_id = f"s{s:02d}_v{v}"
            label = np.full((H, W), WALL, dtype=np.uint8)
            label[H // 2:] = FLOOR
            label[10:30, 5 + 3 * v:30] = FURNITURE
            label[0, :] = 255
            if s % 2 == 1:
                label[12:16, 40:50] = BOOKS
            if s % 2 == 0 and v == 0:
                label[20:24, 50:56] = TV
            rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            write_png(path / "train/images" / f"{image_id}.png", rgb)
            write_png(path / "train/depths" / f"{image_id}.png", np.full((H, W), 1000 + s, dtype=np.uint16))
            write_png(path / "train/labels" / f"{image_id}.png", label)
            rows.append(f"{image_id},scene{s:02d}")
    for t in range(n_test):
        write_png(path / "test/images" / f"t{t}.png", np.zeros((H, W, 3), dtype=np.uint8))
        write_png(path / "test/depths" / f"t{t}.png", np.zeros((H, W), dtype=np.uint16))
    write_text(path / "scenes.csv", "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def root_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_root(tmp_path_factory.mktemp("data") / "root")


@pytest.fixture
def root(root_dir: Path, tmp_path: Path) -> DataRoot:
    """A fresh copy per test, so folds.csv written by one test never leaks into another."""
    return open_root(shutil.copytree(root_dir, tmp_path / "root"))


def test_make_folds_assignment(root: DataRoot) -> None:
    folds = splits.make_folds(root, k=5, seed=42)
    assert list(folds.columns) == ["id", "fold"] and list(folds["id"]) == sorted(root.train_ids)
    assert folds["id"].is_unique and len(folds) == 30
    sizes = folds["fold"].value_counts().sort_index()
    assert list(sizes.index) == [0, 1, 2, 3, 4] and sizes.min() >= 3 and sizes.max() <= 9
    scene_folds = {}
    for image_id, fold in zip(folds["id"], folds["fold"]):
        assert scene_folds.setdefault(root.scenes[image_id], fold) == fold, "scene split across folds"
    # The 5 tv frames come from 5 scenes: stratification spreads them one per fold, whatever the seed
    # (scene grouping alone does so for only ~13% of shuffles).
    tv_ids = [f"s{s:02d}_v0" for s in range(0, 10, 2)]
    for seed in range(8):
        tv_folds = splits.make_folds(root, k=5, seed=seed).set_index("id").loc[tv_ids, "fold"]
        assert sorted(tv_folds) == [0, 1, 2, 3, 4], f"seed {seed}"


def test_deterministic_bytes(root: DataRoot, root_dir: Path, tmp_path: Path) -> None:
    path = splits.ensure_folds(root, k=5, seed=42)
    other = open_root(shutil.copytree(root_dir, tmp_path / "other"))
    assert splits.ensure_folds(other, k=5, seed=42).read_bytes() == path.read_bytes()
    text = path.read_text()
    assert text.startswith("id,fold\ns00_v0,") and text.count("\n") == 31
    # A second call validates and leaves the file alone.
    assert splits.ensure_folds(root, k=5, seed=999).read_bytes() == path.read_bytes()
    assert splits.folds_sha256(root) == splits.folds_sha256(other)
    assert re.fullmatch(r"[0-9a-f]{64}", splits.folds_sha256(root))
    # The seed does change the assignment.
    by_seed = {tuple(splits.make_folds(root, k=5, seed=s)["fold"]) for s in range(6)}
    assert len(by_seed) > 1


def _ensure_in_process(path: str) -> str:
    """Worker: slow make_folds down so that racing processes would all try to write without the lock."""
    real = splits.make_folds

    def slow(*args, **kwargs):
        (Path(path) / f"made_by_{os.getpid()}").touch()
        time.sleep(0.3)
        return real(*args, **kwargs)

    splits.make_folds = slow
    root = open_root(path, verify=False)
    splits.ensure_folds(root, k=5, seed=42)
    return splits.folds_sha256(root)


def test_concurrent_ensure_folds(root: DataRoot) -> None:
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        digests = pool.map(_ensure_in_process, [str(root.path)] * 4)
    assert len(set(digests)) == 1
    assert len(list(root.path.glob("made_by_*"))) == 1, "folds.csv made more than once"
    assert not [p for p in root.path.iterdir() if p.name.endswith(".tmp")]
    folds = splits.read_folds(root)
    assert set(folds) == set(root.train_ids)
    expected = splits.make_folds(root, k=5, seed=42)
    assert folds == dict(zip(expected["id"], expected["fold"]))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: lines + ["zz_unknown,0"], "ids are not train images, e.g. 'zz_unknown'"),
        (lambda lines: lines[:-1], "train images have no fold, e.g. 's09_v2'"),
        (lambda lines: lines + [lines[1]], "duplicate id 's00_v0'"),
        (lambda lines: [re.sub(r",[12]$", ",4", ln) for ln in lines], "fold 1 of 0..4 has no image"),
        (lambda lines: lines[:1] + ["s00_v0,1.5"] + lines[2:], "fold '1.5' is not an integer"),
        (lambda lines: lines[:1] + ["s00_v0,a"] + lines[2:], "fold 'a' is not an integer"),
        (lambda lines: ["image,fold"] + lines[1:], "header must be 'id,fold'"),
    ],
)
def test_read_folds_errors(root: DataRoot, edit, message: str) -> None:
    path = splits.ensure_folds(root, k=5, seed=42)
    lines = path.read_text().splitlines()
    write_text(path, "\n".join(edit(lines)) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: .*{re.escape(message)}"):
        splits.read_folds(root)
    with pytest.raises(DataError, match=re.escape(str(path))):
        splits.ensure_folds(root, k=5)


def test_ensure_folds_k_mismatch_and_missing(root: DataRoot) -> None:
    with pytest.raises(DataError, match="folds.csv: file not found"):
        splits.read_folds(root)
    splits.ensure_folds(root, k=5)
    with pytest.raises(DataError, match="holds 5 folds but k=3 was asked"):
        splits.ensure_folds(root, k=3)


def test_too_few_scenes(tmp_path: Path) -> None:
    root = open_root(make_root(tmp_path / "small", n_scenes=3, views=2, n_test=0))
    with pytest.raises(DataError, match=rf"^{re.escape(str(root.path))}: 3 scenes .* cannot make 5"):
        splits.make_folds(root, k=5)
    assert splits.make_folds(root, k=3)["fold"].nunique() == 3


def test_presence_key() -> None:
    # Class 2 is rarest overall but present in 1 image only (< k=2): it falls back to class 1.
    counts = np.array([[100, 5, 1], [100, 5, 0], [100, 0, 0], [100, 0, 0], [100, 4, 0]])
    np.testing.assert_array_equal(splits.presence_key(counts, k=2), [1, 1, 0, 0, 1])
    # With k=1 every stratum is large enough, so the rarest class wins.
    np.testing.assert_array_equal(splits.presence_key(counts, k=1), [2, 1, 0, 0, 1])


def test_cli(root: DataRoot, capsys: pytest.CaptureFixture[str]) -> None:
    splits.main(["--data-root", str(root.path), "--k", "5", "--seed", "42"])
    out = capsys.readouterr().out
    assert (root.path / "folds.csv").is_file()
    table = out.splitlines()
    assert "images" in table[0] and "tv" in table[0] and "wall" in table[0]
    assert sum(int(line.split()[1]) for line in table[2:7]) == 30
    assert f"sha256 {splits.folds_sha256(root)}" in out
