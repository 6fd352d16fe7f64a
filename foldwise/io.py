"""Atomic file writes (a temporary name in the same folder, fsync, then rename) and strict text reads.

A crash never leaves a half-written file under its final name, so a file that exists is whole. A write that
fails (a full disk, a file-size limit, a folder where a file should be) and a text record that cannot be
decoded are one error naming the user's file, never an internal temporary name or a bare codec message.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_writable(path: str | os.PathLike) -> Path:
    """Raise OSError naming ``path`` unless a file can be written there (checked before any work is done)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; expected a file name")
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not folder.is_dir():
        raise NotADirectoryError(f"{path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: {folder} is not writable")
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by writers of this host that were killed (their pid is gone)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(stale.name)
        if match and not pid_alive(match.group(1)):
            stale.unlink(missing_ok=True)


def pid_alive(pid: object) -> bool:
    """Whether process ``pid`` of this host exists (someone else's counts); False for what is not a pid."""
    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
# What torch.save's and numpy's writers say when the disk refuses a write; they name no errno.
_WRITER_MESSAGES = ("PytorchStreamWriter", "inline_container", "file write failed", "requested and")


def _is_write_failure(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
        return True
    return any(text in str(err) for text in _WRITER_MESSAGES)


def _failed_write(path: Path, err: BaseException) -> OSError:
    reason = " ".join(str(err).split())
    if isinstance(err, RuntimeError):  # torch.save's writer names no errno: say what it usually means
        reason = f"{reason}; is the disk full, or a file-size limit (ulimit -f) reached?"
    elif isinstance(err, OSError) and err.strerror:
        reason = f"[Errno {err.errno}] {err.strerror}"  # without the temporary file's name
    failed = OSError(f"{path}: could not be written ({reason})")
    failed.errno = getattr(err, "errno", None)  # kept for callers; the message names it once, in the reason
    return failed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The temporary is ``.<name>.<pid>.<random>.tmp``: the next write of the same file removes those whose
    writer was killed. A write the disk refuses (full, a file-size limit, read-only; also when torch.save's or
    numpy's writer reports it without an errno) is an OSError naming ``path``; the block's other errors pass
    unchanged. Either way nothing under ``path`` changes.

    Args:
        path: the final file name. Its folder is created when missing.
    """
    path = check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _failed_write(path, err) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
            os.replace(tmp_path, path)
        except (OSError, RuntimeError) as err:
            if not _is_write_failure(err) or str(path) in str(err):
                raise  # the block's own error (a model that fails while its outputs are written, say)
            raise _failed_write(path, err) from err
    finally:
        tmp_path.unlink(missing_ok=True)


def read_text(path: str | os.PathLike) -> str:
    """A text record (CSV, YAML, JSON, a list of ids) as UTF-8; an undecodable one is a ValueError naming it."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "save it as UTF-8") from None


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
    except OSError as err:
        if str(staging) not in str(err):
            raise
        # name the file as the user will find it, not the staging folder that is about to go
        failed = OSError(str(err).replace(str(staging), str(out)))
        failed.errno = err.errno
        raise failed from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON record that must be an object; ValueError naming the file when it is not valid JSON or not one."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data
