"""Importer of the official NYU Depth V2 labelled set (``nyu_depth_v2_labeled.mat``) into the dataset layout.

The .mat is MATLAB v7.3 (HDF5). MATLAB stores arrays column-major, so h5py sees every axis reversed:
``images`` is (N, 3, W, H), ``depths``/``labels`` are (N, W, H) and cell arrays such as ``scenes`` are
datasets of object references to uint16 character arrays. Frames are read one at a time so the file (gigabytes)
never sits in memory.

Usage:
    python -m kfold.data.nyuv2 nyu_depth_v2_labeled.mat --out data/nyuv2 [--split standard|all-train]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from kfold.data.layout import IGNORE_INDEX, DataError
from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.io import read_text, staged_folder, write_png, write_text

MAP_FILE = "map894_to_13.txt"
TRAIN_INDEX_FILE = "train_idx.txt"
TEST_INDEX_FILE = "test_idx.txt"
NUM_CLASSES_13 = 13
SPLITS = ("standard", "all-train")


# The mapping and split files ship with the package (facts, not code: see nyuv2_meta/README.md).
META_DIR = Path(__file__).resolve().parent / "nyuv2_meta"


def _read_ints(path: Path) -> np.ndarray:
    """Read one integer per non-empty line of ``path``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    values = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(int(line.strip()))
        except ValueError:
            raise DataError(f"{path}: line {lineno} is not an integer: {line.strip()!r}") from None
    return np.asarray(values, dtype=np.int64)


def read_label_map(path: Path) -> np.ndarray:
    """Lookup table from raw NYUv2 label ids to project class ids (0..12, 255 = unlabeled).

    Args:
        path: ``map894_to_13.txt``: line i is the 13-class id (0 = unlabeled, 1..13) of raw id i.
    """
    raw_to_13 = _read_ints(path)
    if raw_to_13.size == 0 or raw_to_13.min() < 0 or raw_to_13.max() > NUM_CLASSES_13:
        raise DataError(f"{path}: expected values in 0..{NUM_CLASSES_13}, one per line")
    lut = np.full(raw_to_13.size, IGNORE_INDEX, dtype=np.uint8)
    labelled = raw_to_13 > 0
    lut[labelled] = raw_to_13[labelled] - 1
    return lut


def read_frame_index(path: Path, num_frames: int) -> list[int]:
    """Read a 1-indexed frame list (``train_idx.txt`` / ``test_idx.txt``) and check it against the file."""
    frames = _read_ints(path)
    if frames.size and (frames.min() < 1 or frames.max() > num_frames):
        raise DataError(f"{path}: frame numbers must lie in 1..{num_frames} (1-indexed), got "
                        f"{frames.min()}..{frames.max()}")
    if np.unique(frames).size != frames.size:
        raise DataError(f"{path}: duplicate frame numbers")
    return sorted(int(v) for v in frames)


def frame_id(frame: int) -> str:
    """Image id of a 1-based frame number: ``1 -> "0001"``."""
    return f"{frame:04d}"


def _check_mat(f: h5py.File, mat_path: Path) -> tuple[int, int, int]:
    """Check keys, shapes and dtypes of the opened .mat; return (N, H, W)."""
    for key in ("images", "depths", "labels", "scenes"):
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise DataError(f"{mat_path}: missing dataset {key!r}; is this nyu_depth_v2_labeled.mat?")
    images = f["images"]
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{mat_path}: key 'images' must be uint8 (N, 3, W, H), "
                        f"got {images.dtype} {images.shape}")
    n, _, w, h = images.shape
    for key in ("depths", "labels"):
        if f[key].shape != (n, w, h):
            raise DataError(f"{mat_path}: key {key!r} must have shape {(n, w, h)} like 'images', "
                            f"got {f[key].shape}")
    if not np.issubdtype(f["labels"].dtype, np.integer):
        raise DataError(f"{mat_path}: key 'labels' must hold integer ids, got {f['labels'].dtype}")
    if not np.issubdtype(f["depths"].dtype, np.floating):
        raise DataError(f"{mat_path}: key 'depths' must hold float metres, got {f['depths'].dtype}")
    scenes = f["scenes"]
    if h5py.check_ref_dtype(scenes.dtype) is None or scenes.size != n:
        raise DataError(f"{mat_path}: key 'scenes' must be a cell array (object references) of {n} "
                        f"names, got {scenes.dtype} {scenes.shape}")
    return n, h, w


def read_scenes(f: h5py.File, mat_path: Path) -> list[str]:
    """Decode the ``scenes`` cell array: one name such as ``kitchen_0028`` per frame."""
    names = []
    for i, ref in enumerate(f["scenes"][()].ravel()):
        try:
            chars = np.asarray(f[ref][()]).ravel()
        except (ValueError, KeyError):
            raise DataError(f"{mat_path}: key 'scenes' entry {i} is not a valid object reference") from None
        if not np.issubdtype(chars.dtype, np.integer):
            raise DataError(f"{mat_path}: key 'scenes' entry {i} is not a character array ({chars.dtype})")
        names.append("".join(map(chr, chars)))
    return names


def convert_frame(f: h5py.File, i: int, lut: np.ndarray, mat_path: Path):
    """Read frame ``i`` (0-based) and return (rgb (H,W,3) uint8, depth (H,W) uint16 mm, label (H,W) uint8)."""
    rgb = np.ascontiguousarray(f["images"][i].transpose(2, 1, 0))
    depth_m = f["depths"][i].T.astype(np.float64)
    # Missing or negative readings become 0 (= no reading); far ones saturate instead of wrapping.
    depth_m = np.nan_to_num(depth_m, nan=0.0, posinf=0.0, neginf=0.0)
    depth = np.clip(np.rint(depth_m * 1000.0), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    raw = f["labels"][i].T
    if raw.size and (raw.min() < 0 or raw.max() >= lut.size):
        raise DataError(f"{mat_path}: key 'labels' frame {i + 1} holds raw id {int(raw.max())} outside "
                        f"0..{lut.size - 1} of the label map")
    label = lut[raw.astype(np.int64)]
    return rgb, np.ascontiguousarray(depth), np.ascontiguousarray(label)


def import_nyuv2(mat_path: str | Path, out: str | Path, split: str = "standard",
                 meta: str | Path | None = None, progress: bool | None = None) -> Path:
    """Convert ``nyu_depth_v2_labeled.mat`` into the dataset layout under ``out``.

    Args:
        mat_path: the official MATLAB v7.3 file.
        out: new (or empty) dataset root to write.
        split: ``"standard"`` (795 train / 654 test frames; test labels kept in ``test_labels/``)
            or ``"all-train"`` (every frame in ``train/``).
        meta: folder with ``map894_to_13.txt``, ``train_idx.txt``, ``test_idx.txt``;
            the copy shipped in the package (``kfold/data/nyuv2_meta``) when None.
        progress: show a tqdm bar; default: only when stderr is a terminal.

    Returns:
        The dataset root ``out``.
    """
    mat_path, out = Path(mat_path), Path(out)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta_dir = Path(meta) if meta is not None else META_DIR
    if not meta_dir.is_dir():
        raise DataError(f"{meta_dir}: --meta folder not found")
    lut = read_label_map(meta_dir / MAP_FILE)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: output folder is not empty; choose a new --out")
    if not mat_path.is_file():
        raise DataError(f"{mat_path}: file not found")
    try:
        f = h5py.File(mat_path, "r")
    except OSError:
        raise DataError(f"{mat_path}: not an HDF5 file (the labelled set is MATLAB v7.3)") from None
    with f:
        n, _, _ = _check_mat(f, mat_path)
        scenes = read_scenes(f, mat_path)
        if split == "standard":
            train = read_frame_index(meta_dir / TRAIN_INDEX_FILE, n)
            test = read_frame_index(meta_dir / TEST_INDEX_FILE, n)
            if set(train) & set(test):
                raise DataError(f"{meta_dir / TEST_INDEX_FILE}: frames also listed in {TRAIN_INDEX_FILE}")
        else:
            train, test = list(range(1, n + 1)), []
        jobs = [("train", k) for k in train] + [("test", k) for k in test]
        # One that fails half-way (a bad frame, Ctrl-C, a full disk) leaves nothing that looks like a root.
        quiet = not sys.stderr.isatty() if progress is None else not progress
        with staged_folder(out) as staging:
            for part, frame in tqdm(jobs, desc="nyuv2", unit="frame", disable=quiet):
                rgb, depth, label = convert_frame(f, frame - 1, lut, mat_path)
                name = f"{frame_id(frame)}.png"
                write_png(staging / part / "images" / name, rgb)
                write_png(staging / part / "depths" / name, depth)
                write_png(staging / ("train/labels" if part == "train" else "test_labels") / name, label)
            rows = sorted((frame_id(k), scenes[k - 1]) for k in train + test)
            write_text(staging / "scenes.csv", "id,scene\n" + "".join(f"{i},{s}\n" for i, s in rows))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = ArgumentParser(prog="python -m kfold.data.nyuv2", description=__doc__.split("\n\n")[0])
    parser.add_argument("mat", type=Path, help="nyu_depth_v2_labeled.mat")
    parser.add_argument("--out", type=Path, required=True, help="dataset root to create (new or empty)")
    parser.add_argument("--split", choices=SPLITS, default="standard")
    parser.add_argument("--meta", type=Path, default=None,
                        help=f"folder with {MAP_FILE} and the split files (default: the copy shipped in "
                             f"kfold/data/{META_DIR.name})")
    args = parser.parse_args(argv)

    def body() -> None:
        root = import_nyuv2(args.mat, args.out, split=args.split, meta=args.meta)
        print(f"wrote {root}")

    return run_entry_point(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
