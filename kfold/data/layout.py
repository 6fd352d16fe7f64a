"""The dataset root contract (see docs/ARCHITECTURE.md): listing, validating and reading its PNGs.

Every problem with a root is a :class:`DataError` whose one-line message starts with the offending path.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile

from foldwise.io import read_text
from foldwise.classes import DEFAULT_CLASSES, IGNORE_INDEX
from foldwise import labels
from foldwise.classmap import ClassMap, read_class_map

SPLITS = ("train", "test")
TEACHER_DIR = "teacher_depths"  # beside train/depths: a depth teacher's prediction, <id>.png (mm) or <id>.npy (m)

_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens a 16-bit greyscale PNG

# A truncated PNG must fail loudly rather than come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(ValueError):
    """A dataset root breaks the layout contract; the message is one line starting with the file path."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def _error(path: str | os.PathLike, message: str) -> DataError:
    return DataError(f"{path}: {message}")


@dataclass(frozen=True)
class DataRoot:
    """A validated dataset root.

    Args:
        path: the root folder.
        classes: class names; the index is the class id (after the class map, when there is one).
        train_ids / test_ids: sorted file stems of ``train/images`` and ``test/images``.
        image_size: (H, W) shared by every image of the root.
        scenes: train id -> scene (the id itself when the root has no ``scenes.csv``).
        has_depth: the root has ``depths/`` folders (an RGB-only root has none).
        class_map: merges the root's own classes (``class_map.source_classes``) when labels are read.
    """

    path: Path
    classes: tuple[str, ...]
    train_ids: tuple[str, ...] = field(repr=False)
    test_ids: tuple[str, ...] = field(repr=False)
    image_size: tuple[int, int]
    scenes: dict[str, str] = field(repr=False, compare=False)
    has_depth: bool = True
    class_map: ClassMap | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def source_classes(self) -> tuple[str, ...]:
        """The classes of the label PNGs on disk (before the class map)."""
        return self.class_map.source_classes if self.class_map else self.classes

    @property
    def has_test_labels(self) -> bool:
        return (self.path / "test_labels").is_dir()

    @property
    def teacher_dir(self) -> Path:
        return self.path / "train" / TEACHER_DIR

    @property
    def has_teacher(self) -> bool:
        return self.teacher_dir.is_dir()

    def label(self, split: str, image_id: str) -> np.ndarray:
        """The label of ``image_id`` as uint8 (H, W) class ids of :attr:`classes` (merged) or 255."""
        label = read_label(self.label_path(split, image_id), len(self.source_classes))
        return self.class_map.apply(label) if self.class_map else label

    def teacher_depth(self, image_id: str) -> np.ndarray:
        """The depth teacher's prediction for a train image: float32 (H, W) metres, 0 = none."""
        return read_teacher_depth(self.teacher_dir, image_id, self.image_size)

    def _split_dir(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.path / split

    def image_path(self, split: str, image_id: str) -> Path:
        return self._split_dir(split) / "images" / f"{image_id}.png"

    def depth_path(self, split: str, image_id: str) -> Path:
        return self._split_dir(split) / "depths" / f"{image_id}.png"

    def label_path(self, split: str, image_id: str) -> Path:
        if self._split_dir(split).name == "test":
            return self.path / "test_labels" / f"{image_id}.png"
        return self.path / "train" / "labels" / f"{image_id}.png"

    def ids(self, split: str) -> tuple[str, ...]:
        """The sorted ids of ``split`` ("train" or "test")."""
        return self.train_ids if self._split_dir(split).name == "train" else self.test_ids


# ----------------------------------------------------------------------------------------------- reading
def source_name(source: str | os.PathLike | BinaryIO) -> Path:
    """What error messages call a file: its path, or the ``name`` of an in-memory file (e.g. a shard member)."""
    return Path(source.name) if hasattr(source, "read") else Path(source)


def _open(path: Path | BinaryIO) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise _error(source_name(path), "file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _error(source_name(path), f"unreadable image ({e})") from None


def _decode(source: Path | BinaryIO, check_mode: Callable[[Path, Image.Image], None]) -> np.ndarray:
    path = source_name(source)
    with _open(source) as img:
        check_mode(path, img)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise _error(path, f"unreadable or truncated PNG ({e})") from None
        return np.asarray(img)


def _check_rgb_mode(path: Path, img: Image.Image) -> None:
    if img.mode != "RGB":
        raise _error(
            path,
            f"mode {img.mode}, expected 8-bit RGB; convert it with PIL.Image.open(p).convert('RGB').save(p)",
        )


def _check_depth_mode(path: Path, img: Image.Image) -> None:
    if img.mode not in _DEPTH_MODES:
        bits = "8-bit" if img.mode in ("L", "P", "1") else f"mode {img.mode}"
        raise _error(
            path,
            f"{bits} depth PNG, expected a single-channel 16-bit PNG of millimetres (uint16, 0 = no reading)",
        )


def read_rgb(path: str | os.PathLike | BinaryIO) -> np.ndarray:
    """Read an 8-bit RGB PNG (a path or a named in-memory file) as uint8 (H, W, 3); anything else is a DataError."""
    return _decode(path if hasattr(path, "read") else Path(path), _check_rgb_mode)


def read_depth(path: str | os.PathLike | BinaryIO) -> np.ndarray:
    """Read a 16-bit millimetre depth PNG (a path or a named in-memory file) as float32 (H, W) metres; 0.0 = missing."""
    depth = _decode(path if hasattr(path, "read") else Path(path), _check_depth_mode)
    return depth.astype(np.float32) / np.float32(1000.0)


def read_teacher_depth(folder: Path, image_id: str, size: tuple[int, int]) -> np.ndarray:
    """A teacher's depth: ``<id>.png`` (16-bit mm, 0 = none, as the sensor) or ``<id>.npy`` (float32 metres)."""
    png, npy = folder / f"{image_id}.png", folder / f"{image_id}.npy"
    if png.is_file():
        depth = read_depth(png)
        path = png
    elif npy.is_file():
        try:
            depth = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _error(npy, f"unreadable .npy ({e})") from None
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.floating):
            raise _error(npy, f"expected a 2-D float array of metres, got {depth.dtype} {depth.shape}")
        depth = np.nan_to_num(depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        depth[depth < 0] = 0.0
        path = npy
    else:
        raise _error(png, f"missing teacher depth for image {image_id!r} (<id>.png in mm or <id>.npy in metres)")
    if depth.shape != tuple(size):
        raise _error(path, f"size {depth.shape[0]}x{depth.shape[1]} (HxW) differs from the root's {size[0]}x{size[1]}")
    return depth


def read_label(path: str | os.PathLike | BinaryIO, num_classes: int) -> np.ndarray:
    """Read an 8-bit label PNG as uint8 (H, W) with values in [0, num_classes) or 255 (a DataError otherwise)."""
    return labels.read_label(path, num_classes, DataError)


# ----------------------------------------------------------------------------------------------- listing
def _list_pngs(folder: Path) -> dict[str, Path]:
    """Map id -> path for the ``<id>.png`` files of ``folder`` (hidden files, e.g. temporaries, skipped)."""
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.suffix != ".png" or not entry.is_file():
            raise _error(entry, f"unexpected entry; {folder} may hold only <id>.png files")
        found[entry.stem] = entry
    return found


def _match_ids(ids: Iterable[str], folder: Path, what: str, images_dir: Path) -> None:
    """Require ``folder`` to hold exactly one ``<id>.png`` per image id."""
    ids = list(ids)
    if not folder.is_dir():
        raise _error(folder, f"missing folder; every image of {images_dir} needs its {what}")
    present = _list_pngs(folder)
    missing = [i for i in ids if i not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _error(folder / f"{missing[0]}.png", f"missing {what} for image {missing[0]!r}{more}")
    extra = sorted(set(present) - set(ids))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise _error(present[extra[0]], f"{what} without a matching image in {images_dir}{more}")


def _read_classes(root: Path) -> tuple[str, ...]:
    path = root / "classes.txt"
    if not path.exists():
        return DEFAULT_CLASSES
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not names:
        raise _error(path, "empty; expected one class name per line")
    dupes = sorted(name for name, count in Counter(names).items() if count > 1)
    if dupes:
        raise _error(path, f"duplicate class names: {', '.join(dupes)}")
    if len(names) > IGNORE_INDEX:
        raise _error(path, f"{len(names)} classes; at most {IGNORE_INDEX} fit beside ignore={IGNORE_INDEX}")
    return tuple(names)


def _read_scenes(root: Path, train_ids: tuple[str, ...], test_ids: tuple[str, ...]) -> dict[str, str]:
    path = root / "scenes.csv"
    if not path.exists():
        return {i: i for i in train_ids}
    try:
        reader = csv.DictReader(io.StringIO(read_text(path)))
        if reader.fieldnames is None or not {"id", "scene"} <= set(reader.fieldnames):
            raise _error(path, f"header {reader.fieldnames}, expected columns id,scene")
        rows = [(row["id"], row["scene"]) for row in reader]
    except (ValueError, csv.Error) as err:
        raise _error(path, str(err).removeprefix(f"{path}: ")) from None
    known = set(train_ids) | set(test_ids)
    scenes: dict[str, str] = {}
    for line, (image_id, scene) in enumerate(rows, start=2):
        if image_id not in known:
            raise _error(path, f"line {line}: unknown id {image_id!r} (not in train/images or test/images)")
        if image_id in scenes:
            raise _error(path, f"line {line}: id {image_id!r} listed twice")
        if not scene:
            raise _error(path, f"line {line}: empty scene for id {image_id!r}")
        scenes[image_id] = scene
    missing = [i for i in train_ids if i not in scenes]
    if missing:
        raise _error(path, f"no scene for {len(missing)} train ids, e.g. {missing[0]!r}")
    return {i: scenes[i] for i in train_ids}


# ---------------------------------------------------------------------------------------------- verifying
def _header(path: Path, check_mode: Callable[[Path, Image.Image], None]) -> tuple[int, int]:
    """Check mode and PNG integrity without decoding the pixels; return (H, W)."""
    with _open(path) as img:
        if img.format != "PNG":
            raise _error(path, f"{img.format} data, expected PNG")
        check_mode(path, img)
        size = (img.height, img.width)
        try:
            img.verify()  # walks every chunk and checks its CRC: catches truncation cheaply
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise _error(path, f"unreadable or truncated PNG ({e})") from None
    return size


def _check_size(path: Path, size: tuple[int, int], expected: tuple[int, int], reference: Path) -> None:
    if size != expected:
        raise _error(
            path,
            f"size {size[0]}x{size[1]} (HxW) differs from the root's {expected[0]}x{expected[1]} "
            f"(from {reference.name})",
        )


def _verify_split(root: DataRoot, split: str, ids: tuple[str, ...], reference: Path, labels: bool) -> None:
    size = root.image_size

    def check(image_id: str) -> None:
        path = root.image_path(split, image_id)
        _check_size(path, _header(path, _check_rgb_mode), size, reference)
        if root.has_depth:
            path = root.depth_path(split, image_id)
            _check_size(path, _header(path, _check_depth_mode), size, reference)
        if labels:
            path = root.label_path(split, image_id)
            label = read_label(path, len(root.source_classes))  # full decode: values must be checked
            _check_size(path, label.shape, size, reference)

    # PNG inflate releases the GIL, so threads speed up the full label decode.
    workers = min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for _ in pool.map(check, ids):  # re-raises the first DataError in id order
            pass
    finally:
        pool.shutdown(cancel_futures=True)


def _match_teacher(root: Path, train_ids: tuple[str, ...]) -> None:
    """``train/teacher_depths``, when present, holds one ``<id>.png`` or ``<id>.npy`` per train image."""
    folder = root / "train" / TEACHER_DIR
    if not folder.is_dir():
        return
    stems: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.suffix not in (".png", ".npy") or entry.stem in stems:
            raise _error(entry, f"unexpected entry; {folder} holds one <id>.png (mm) or <id>.npy (m) per image")
        stems[entry.stem] = entry
    missing = [i for i in train_ids if i not in stems]
    if missing:
        raise _error(folder / f"{missing[0]}.png", f"missing teacher depth for image {missing[0]!r} "
                                                   f"({len(missing)} of {len(train_ids)} missing)")
    extra = sorted(set(stems) - set(train_ids))
    if extra:
        raise _error(stems[extra[0]], "teacher depth without a matching image in train/images")


def _list_images(folder: Path, missing_hint: str) -> dict[str, Path]:
    """The ``<id>.png`` files of a split's ``images/`` folder; it must exist and hold at least one."""
    if not folder.is_dir():
        raise _error(folder, f"missing folder; {missing_hint}")
    found = _list_pngs(folder)
    if not found:
        raise _error(folder, f"empty split: no <id>.png {folder.parent.name} images")
    return found


def _list_test(root: Path, has_depth: bool) -> tuple[str, ...]:
    """Ids of the optional test split, with its depths (when the root has depth) and optional labels."""
    if not (root / "test").exists():
        if (root / "test_labels").exists():
            raise _error(root / "test_labels", "test labels without a test/ split")
        return ()
    images = root / "test" / "images"
    test_ids = tuple(sorted(_list_images(images, "remove test/ entirely for a root without a test split")))
    if has_depth:
        _match_ids(test_ids, root / "test" / "depths", "depth", images)
    elif (root / "test" / "depths").exists():
        raise _error(root / "test" / "depths", "test depths without train/depths; add those or remove these")
    if (root / "test_labels").exists():
        _match_ids(test_ids, root / "test_labels", "test label", images)
    return test_ids


def open_root(path: str | os.PathLike, verify: bool = True, class_map: str | os.PathLike | ClassMap | None = None
              ) -> DataRoot:
    """Open a dataset root and check it against the layout contract.

    Args:
        path: the root folder (``train/``; optional ``depths/``, ``train/teacher_depths``, ``test/``,
            ``test_labels/``, ``scenes.csv``, ``classes.txt``).
        verify: check every file (modes, sizes, PNG integrity, label values). When False only the ids are
            listed and cross-checked, and one image is read for the size.
        class_map: a class map file (or shipped map name), or a :class:`ClassMap`, merging the root's classes
            when labels are read.

    Returns:
        the :class:`DataRoot`.
    """
    root = Path(path)
    if not root.is_dir():
        raise _error(root, "dataset root not found (expected a folder with train/images, train/labels, ...)")
    classes = _read_classes(root)
    if class_map is not None and not isinstance(class_map, ClassMap):
        class_map = read_class_map(class_map, classes)
    elif class_map is not None and class_map.source_classes != classes:
        raise _error(root, f"classes {list(classes)} differ from those the class map was made for "
                           f"{list(class_map.source_classes)}")

    train = _list_images(root / "train" / "images", "a dataset root needs train/images/<id>.png")
    train_ids = tuple(sorted(train))
    has_depth = (root / "train" / "depths").exists()
    if has_depth:
        _match_ids(train_ids, root / "train" / "depths", "depth", root / "train" / "images")
    _match_ids(train_ids, root / "train" / "labels", "label", root / "train" / "images")
    _match_teacher(root, train_ids)
    test_ids = _list_test(root, has_depth)
    clash = sorted(set(train_ids) & set(test_ids))
    if clash:
        raise _error(root / "test" / "images" / f"{clash[0]}.png", "id also present in train/images")

    scenes = _read_scenes(root, train_ids, test_ids)
    reference = train[train_ids[0]]
    image_size = _header(reference, _check_rgb_mode)
    shown = class_map.classes if class_map else classes
    data_root = DataRoot(root, shown, train_ids, test_ids, image_size, scenes, has_depth, class_map)
    if verify:
        _verify_split(data_root, "train", train_ids, reference, labels=True)
        if test_ids:
            _verify_split(data_root, "test", test_ids, reference, labels=data_root.has_test_labels)
    return data_root
