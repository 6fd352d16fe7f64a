"""Atomic file writes: a temporary name in the same folder, fsync, then rename.

A crash never leaves a half-written file under its final name, so a file that exists is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    Args:
        path: the final file name. Its folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (store arrays can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an image array to a PNG atomically.

    Args:
        path: destination ``.png``.
        array: (H, W, 3) uint8 RGB, (H, W) uint8 labels or (H, W) uint16 depth.
    """
    if array.dtype == np.uint16 and array.ndim != 2:
        raise ValueError(f"{path}: a uint16 PNG must be single-channel, got shape {array.shape}")
    # Pillow picks mode I;16 for little-endian uint16 by itself.
    image = Image.fromarray(array.astype("<u2", copy=False) if array.dtype == np.uint16 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden staging folder that is renamed onto ``out`` when the block succeeds.

    For writers of whole folders (a dataset root): one that fails half-way leaves nothing that looks
    complete under ``out``; the staging folder is removed.

    Args:
        out: a folder that does not exist yet or is empty.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output folder exists and is not empty; choose a new --out")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run of ours; never read
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
