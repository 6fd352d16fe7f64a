"""Reading a label PNG: 8-bit class ids, 255 = ignore. One reader for training, scoring and submissions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile

from foldwise.classes import IGNORE_INDEX

LABEL_MODES = ("L", "P")  # palette PNGs store class ids as palette indices
# A truncated PNG must fail loudly rather than come back half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def read_label(path: str | os.PathLike | BinaryIO, num_classes: int, error: type[Exception] = ValueError
               ) -> np.ndarray:
    """uint8 (H, W) class ids in ``[0, num_classes)`` or 255.

    Args:
        path: the label PNG, or an in-memory file whose ``name`` error messages use (e.g. a shard member).
        num_classes: C; any other value but 255 is an error.
        error: the exception raised (its message starts with the path), e.g. the caller's own error type.
    """
    source = path if hasattr(path, "read") else Path(path)
    path = Path(source.name) if hasattr(source, "read") else source
    try:
        img = Image.open(source)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise error(f"{path}: unreadable image ({e})") from None
    with img:
        if img.mode not in LABEL_MODES:
            raise error(f"{path}: mode {img.mode}, expected a single-channel 8-bit PNG of class ids (L or P)")
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise error(f"{path}: unreadable or truncated PNG ({e})") from None
        label = np.asarray(img).astype(np.uint8, copy=False)
    # max() and a mask are cheaper than bincount on uint8; the values are listed only on failure.
    if label.max(initial=0) >= num_classes:
        invalid = (label >= num_classes) & (label != IGNORE_INDEX)
        if invalid.any():
            bad = np.unique(label[invalid])
            shown = ", ".join(str(v) for v in bad[:5]) + (" ..." if bad.size > 5 else "")
            raise error(f"{path}: label value {shown} outside the class range 0..{num_classes - 1} and not "
                        f"{IGNORE_INDEX}")
    return label
