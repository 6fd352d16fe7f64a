"""Dataset root contract: listing, reading, and one clear error per way a root can be broken."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from foldwise.io import write_png, write_text
from kfold.data.layout import (
    DEFAULT_CLASSES,
    DataError,
    open_root,
    read_depth,
    read_label,
    read_rgb,
)

H, W = 48, 64
TRAIN = [f"r{i // 2:04d}_v{i % 2}" for i in range(6)]
TEST = ["t0", "t1"]


def make_root(path: Path) -> Path:
    """6 train and 2 test frames of 48x64 with test labels and a scenes.csv."""
    rng = np.random.default_rng(0)
    for split, ids in (("train", TRAIN), ("test", TEST)):
        labels = path / ("train/labels" if split == "train" else "test_labels")
        for image_id in ids:
            write_png(path / split / "images" / f"{image_id}.png", rng.integers(0, 256, (H, W, 3), np.uint8))
            write_png(path / split / "depths" / f"{image_id}.png", rng.integers(0, 9000, (H, W), np.uint16))
            label = rng.integers(0, 13, (H, W)).astype(np.uint8)
            label[0] = 255
            write_png(labels / f"{image_id}.png", label)
    rows = [f"{i},{i.split('_')[0]}" for i in TRAIN] + [f"{i},test_{i}" for i in TEST]
    write_text(path / "scenes.csv", "id,scene\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_root(tmp_path_factory.mktemp("layout") / "root")


@pytest.fixture
def root_dir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, free to break."""
    return shutil.copytree(pristine, tmp_path / "root")


def test_open_root_lists_sorted_ids_and_metadata(root_dir: Path) -> None:
    root = open_root(root_dir)
    assert root.train_ids == tuple(sorted(TRAIN)) and root.test_ids == tuple(TEST)
    assert root.image_size == (H, W)
    assert root.classes == DEFAULT_CLASSES and root.num_classes == 13
    assert root.has_test_labels
    assert root.scenes == {i: i.split("_")[0] for i in TRAIN}  # train ids only
    assert root.image_path("train", "r0000_v0") == root_dir / "train/images/r0000_v0.png"
    assert root.depth_path("test", "t0") == root_dir / "test/depths/t0.png"
    assert root.label_path("train", "r0000_v0") == root_dir / "train/labels/r0000_v0.png"
    assert root.label_path("test", "t1") == root_dir / "test_labels/t1.png"
    with pytest.raises(ValueError, match="split"):
        root.image_path("valid", "r0000_v0")
    assert open_root(root_dir, verify=False) == root


def test_optional_files_absent(root_dir: Path) -> None:
    shutil.rmtree(root_dir / "test")
    shutil.rmtree(root_dir / "test_labels")
    (root_dir / "scenes.csv").unlink()
    root = open_root(root_dir)
    assert root.test_ids == () and not root.has_test_labels
    assert root.scenes == {i: i for i in TRAIN}


def test_classes_txt_sets_the_class_range(root_dir: Path) -> None:
    write_text(root_dir / "classes.txt", "background\nsidewalk\n")
    for image_id in TRAIN:
        write_png(root_dir / "train/labels" / f"{image_id}.png", np.full((H, W), 1, np.uint8))
    shutil.rmtree(root_dir / "test_labels")
    root = open_root(root_dir)
    assert root.classes == ("background", "sidewalk") and root.num_classes == 2
    bad = root_dir / "train/labels" / f"{TRAIN[3]}.png"
    write_png(bad, np.full((H, W), 2, np.uint8))
    with pytest.raises(DataError, match="value 2 "):
        open_root(root_dir)


def test_readers(root_dir: Path) -> None:
    depth_mm = np.array([[0, 250, 1234, 65535]], dtype=np.uint16)
    write_png(root_dir / "d.png", depth_mm)
    depth = read_depth(root_dir / "d.png")
    assert depth.dtype == np.float32 and depth.shape == (1, 4)
    np.testing.assert_allclose(depth, depth_mm / 1000.0, rtol=1e-6)
    rgb = read_rgb(root_dir / "train/images/r0000_v0.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    label = read_label(root_dir / "train/labels/r0000_v0.png", 13)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= set(range(13)) | {255}
    # Palette PNGs carry class ids as palette indices.
    pal = Image.fromarray(label, mode="L").convert("P")
    pal.putpalette([0, 0, 0] * 256)
    pal.putdata(label.ravel().tolist())
    pal.save(root_dir / "p.png")
    np.testing.assert_array_equal(read_label(root_dir / "p.png", 13), label)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_verify_false_skips_content_but_readers_still_check(root_dir: Path) -> None:
    bad = root_dir / "train/labels" / f"{TRAIN[2]}.png"
    write_png(bad, np.full((H, W), 40, np.uint8))
    root = open_root(root_dir, verify=False)
    assert root.train_ids == tuple(sorted(TRAIN))
    with pytest.raises(DataError, match="value 40"):
        read_label(root.label_path("train", TRAIN[2]), root.num_classes)


Breaker = Callable[[Path], Path]  # breaks a root; returns the path its error message must start with


def unlink(rel: str) -> Breaker:
    def brk(r: Path) -> Path:
        (r / rel).unlink()
        return r / rel

    return brk


def rmtree(rel: str, culprit: str) -> Breaker:
    def brk(r: Path) -> Path:
        shutil.rmtree(r / rel)
        return r / culprit

    return brk


def copy(src: str, dst: str) -> Breaker:
    def brk(r: Path) -> Path:
        shutil.copy(r / src, r / dst)
        return r / dst

    return brk


def png(rel: str, array: np.ndarray) -> Breaker:
    def brk(r: Path) -> Path:
        write_png(r / rel, array)
        return r / rel

    return brk


def text(rel: str, content: str, append: bool = False) -> Breaker:
    def brk(r: Path) -> Path:
        with open(r / rel, "a" if append else "w") as f:
            f.write(content)
        return r / rel

    return brk


def truncate(rel: str) -> Breaker:
    def brk(r: Path) -> Path:
        data = (r / rel).read_bytes()
        (r / rel).write_bytes(data[: len(data) // 2])
        return r / rel

    return brk


def convert(rel: str, mode: str) -> Breaker:
    def brk(r: Path) -> Path:
        with Image.open(r / rel) as img:
            img.convert(mode).save(r / rel)
        return r / rel

    return brk


def jpeg(rel: str) -> Breaker:
    def brk(r: Path) -> Path:
        with Image.open(r / rel) as img:
            img.save(r / rel, format="JPEG")
        return r / rel

    return brk


def empty(folder: str) -> Breaker:
    def brk(r: Path) -> Path:
        for path in (r / folder).iterdir():
            path.unlink()
        return r / folder

    return brk


def empty_train(r: Path) -> Path:
    for sub in ("images", "depths", "labels"):
        empty(f"train/{sub}")(r)
    return r / "train/images"


CASES: dict[str, tuple[Breaker, tuple[str, ...]]] = {
    "missing depth": (unlink("train/depths/r0001_v1.png"), ("missing depth", "r0001_v1")),
    "missing train label": (unlink("train/labels/r0000_v1.png"), ("missing label",)),
    "missing test depth": (unlink("test/depths/t1.png"), ("missing depth",)),
    "missing test label": (unlink("test_labels/t0.png"), ("missing test label",)),
    "depth without image": (copy("train/depths/r0000_v0.png", "train/depths/zz.png"), ("without a matching",)),
    "test label without image": (copy("test_labels/t0.png", "test_labels/t9.png"), ("without a matching",)),
    "label out of range": (
        png("train/labels/r0002_v0.png", np.full((H, W), 13, np.uint8)),
        ("label value 13", "0..12", "255"),
    ),
    "test label out of range": (png("test_labels/t1.png", np.full((H, W), 200, np.uint8)), ("label value 200",)),
    "image size": (png("train/images/r0002_v1.png", np.zeros((50, W, 3), np.uint8)), ("50x64", "48x64")),
    "depth size": (png("test/depths/t0.png", np.zeros((H, 60), np.uint16)), ("48x60", "48x64")),
    "label size": (png("train/labels/r0001_v0.png", np.zeros((H, 60), np.uint8)), ("48x60", "48x64")),
    "truncated image": (truncate("train/images/r0001_v0.png"), ("truncated",)),
    "truncated depth": (truncate("test/depths/t1.png"), ("truncated",)),
    "truncated label": (truncate("train/labels/r0002_v1.png"), ("truncated",)),
    "unreadable image": (text("train/images/r0000_v1.png", "not a png at all"), ("unreadable",)),
    "jpeg named png": (jpeg("train/images/r0002_v0.png"), ("JPEG data, expected PNG",)),
    "rgba image": (convert("train/images/r0001_v1.png", "RGBA"), ("mode RGBA", "convert('RGB')")),
    "grey image": (convert("test/images/t0.png", "L"), ("mode L", "convert('RGB')")),
    "8-bit depth": (
        png("train/depths/r0002_v0.png", np.full((H, W), 7, np.uint8)),
        ("8-bit depth", "16-bit", "millimetres"),
    ),
    "rgb label": (convert("train/labels/r0000_v0.png", "RGB"), ("mode RGB",)),
    "empty train split": (empty_train, ("empty split",)),
    "no train folder": (rmtree("train", "train/images"), ("missing folder",)),
    "empty test split": (empty("test/images"), ("empty split",)),
    "test without images folder": (rmtree("test/images", "test/images"), ("missing folder",)),
    "stray file": (text("train/images/notes.txt", "x"), ("unexpected entry",)),
    "scenes unknown id": (text("scenes.csv", "ghost,kitchen\n", append=True), ("unknown id 'ghost'",)),
    "scenes missing train id": (text("scenes.csv", "id,scene\nr0000_v0,a\n"), ("no scene for 5 train ids",)),
    "scenes bad header": (text("scenes.csv", "image,room\n"), ("expected columns id,scene",)),
    "classes empty": (text("classes.txt", "\n"), ("empty",)),
    "classes duplicate": (text("classes.txt", "wall\nfloor\nwall\n"), ("duplicate", "wall")),
    "root missing": (rmtree(".", "."), ("not found",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_root_gives_one_line_error_naming_the_file(root_dir: Path, case: str) -> None:
    breaker, fragments = CASES[case]
    culprit = breaker(root_dir)
    with pytest.raises(DataError) as info:
        open_root(root_dir)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{culprit}:"), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("case", ["missing depth", "depth without image", "scenes unknown id", "classes empty"])
def test_listing_errors_also_raised_without_verify(root_dir: Path, case: str) -> None:
    breaker, _ = CASES[case]
    culprit = breaker(root_dir)
    with pytest.raises(DataError, match=f"^{culprit}:"):
        open_root(root_dir, verify=False)


def test_data_error_is_a_value_error_and_one_line() -> None:
    err = DataError("x.png: first\nsecond")
    assert isinstance(err, ValueError) and str(err) == "x.png: first second"
