"""The default class list (NYUv2-13) and the ignore label, shared by training, scoring and submissions."""

from __future__ import annotations

IGNORE_INDEX = 255

DEFAULT_CLASSES: tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
    "picture", "sofa", "table", "tv", "wall", "window",
)
