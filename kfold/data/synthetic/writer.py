"""Writing a synthetic dataset root: rooms rendered view by view, PNGs written by a background thread.

Each room is a box (floor, ceiling, four walls) furnished with axis-aligned boxes: beds, sofas, tables,
chairs, cabinets and shelves with books, a tv, pictures, windows, doors and small objects. Views are
rendered by vectorised ray casting (slab tests of all pixels of a box's screen rectangle at once) and
written as RGB, 16-bit millimetre depth with Kinect-like noise and holes, 13-class labels and, for train
images, a depth teacher's prediction (`train/teacher_depths/`: dense, with a few per cent of scale error).

Example:
    python -m kfold.data.synthetic --out data/synthetic --train 400 --test 100 --size 240x320
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from kfold.data.layout import DEFAULT_CLASSES, IGNORE_INDEX
from kfold.data.synthetic.render import render_view
from kfold.data.synthetic.rooms import build_room
from foldwise.cli import ArgumentParser, at_least, run_entry_point
from foldwise.io import atomic_path, staged_folder, write_text



_PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]


def _encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB, label or 16-bit depth array.

    OpenCV with one fixed row filter and zlib level 1: faster than Pillow's adaptive filters on noisy RGB-D
    (PNG encoding is a large share of the cost of an image), for slightly larger files.
    """
    if array.ndim == 3:
        array = array[..., ::-1]  # OpenCV expects BGR
    ok, buf = cv2.imencode(".png", array, _PNG_OPTIONS)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an array of shape {array.shape} and dtype {array.dtype}")
    return buf.tobytes()


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (temporary name, fsync, rename)."""
    data = _encode_png(array)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _plan(n_train: int, n_test: int, views_per_room: int) -> list[tuple[str, int, int]]:
    """(split, room index, views) for every room; train rooms first, so rooms never straddle splits."""
    plan, room = [], 0
    for split, n in (("train", n_train), ("test", n_test)):
        for start in range(0, n, views_per_room):
            plan.append((split, room, min(views_per_room, n - start)))
            room += 1
    return plan


def generate(
    out: Path,
    n_train: int,
    n_test: int,
    size: tuple[int, int],
    seed: int,
    views_per_room: int = 4,
    progress: bool | None = None,
) -> Path:
    """Write a synthetic dataset root in the contract layout and return its path.

    Args:
        out: root folder to create (new or empty; written through a staging folder).
        n_train / n_test: number of train and test images (test labels go to ``test_labels/``).
        size: (H, W) of every image.
        seed: the same seed gives byte-identical files (each room has its own ``[seed, room]`` generator).
        views_per_room: camera poses per room; a room is one scene in ``scenes.csv``.
        progress: show a tqdm bar; default: only when stderr is a terminal.
    """
    _generate(Path(out), n_train, n_test, size, seed, views_per_room, progress)
    return Path(out)


def _generate(out: Path, n_train, n_test, size, seed, views_per_room, progress) -> np.ndarray:
    """:func:`generate`; returns the label histogram (256 bins, train and test) of what it wrote."""
    for name, value, least in (("train", n_train, 1), ("test", n_test, 0), ("views-per-room", views_per_room, 1)):
        if value < least:
            raise ValueError(f"--{name} {value}: must be at least {least}")
    if min(size) < 8:
        raise ValueError(f"--size {size[0]}x{size[1]}: both sides must be at least 8 pixels")
    with staged_folder(out) as staging:
        return _write_rooms(staging, n_train, n_test, size, seed, views_per_room, progress)


def _write_rooms(out: Path, n_train, n_test, size, seed, views_per_room, progress) -> np.ndarray:
    counts = np.zeros(256, np.int64)
    rows = ["id,scene"]
    disable = not sys.stderr.isatty() if progress is None else not progress
    pending: deque[Future] = deque()
    # a writer thread overlaps PNG encoding and fsync with rendering; the bounded queue caps memory
    with ThreadPoolExecutor(1) as writer, tqdm(total=n_train + n_test, desc="synthetic", unit="img",
                                               disable=disable) as bar:  # fmt: skip
        for split, room_index, views in _plan(n_train, n_test, views_per_room):
            rng = np.random.default_rng([seed, room_index])
            room = build_room(rng)
            for view in range(views):
                image_id = f"r{room_index:04d}_v{view}"
                rgb, depth, label, teacher = render_view(rng, room, size)
                label_dir = out / "train" / "labels" if split == "train" else out / "test_labels"
                arrays = [(out / split / "images", rgb), (out / split / "depths", depth), (label_dir, label)]
                if split == "train":  # a depth teacher's prediction, for loss.depth_target teacher / hybrid
                    arrays.append((out / "train" / "teacher_depths", teacher))
                for path, array in arrays:
                    pending.append(writer.submit(_write_png, path / f"{image_id}.png", array))
                while len(pending) > 12:
                    pending.popleft().result()
                counts += np.bincount(label.ravel(), minlength=256)
                rows.append(f"{image_id},room{room_index:04d}")
                bar.set_postfix(split=split, room=room_index, refresh=False)
                bar.update()
        for future in pending:
            future.result()
    write_text(out / "scenes.csv", "\n".join(rows) + "\n")
    return counts


def _reuse_freed_memory() -> None:
    """Keep freed numpy temporaries in the heap instead of unmapping them (glibc only).

    Every image allocates many arrays above glibc's mmap threshold; by default glibc maps and unmaps blocks
    that big, and faulting fresh pages in again is a large share of the run time. Called by the CLI only,
    since it changes the allocator of the whole process.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxW, e.g. 240x320") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    """Command line: write the dataset, then print the pixel share of every class."""
    parser = ArgumentParser(prog="python -m kfold.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset root to create (new or empty)")
    parser.add_argument("--train", type=at_least(1), default=400)
    parser.add_argument("--test", type=at_least(0), default=100)
    parser.add_argument("--size", type=_size, default=(240, 320))
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument("--views-per-room", type=at_least(1), default=4)
    args = parser.parse_args(argv)
    return run_entry_point(lambda: _write_and_report(args), args.debug)


def _write_and_report(args) -> None:
    _reuse_freed_memory()
    start = time.perf_counter()
    counts = _generate(args.out, args.train, args.test, args.size, args.seed, args.views_per_room, None)
    seconds, total = time.perf_counter() - start, counts.sum()
    n = args.train + args.test
    print(
        f"wrote {args.train} train + {args.test} test images to {args.out} in {seconds:.1f} s "
        f"({n / seconds:.1f} images/s); class pixel shares:"
    )
    for i, name in enumerate(DEFAULT_CLASSES):
        print(f"  {i:2d} {name:<10s} {100 * counts[i] / total:5.1f}%")
    print(f"  -- ignore     {100 * counts[IGNORE_INDEX] / total:5.1f}%")


if __name__ == "__main__":
    sys.exit(main())
