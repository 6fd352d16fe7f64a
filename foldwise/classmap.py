"""Class maps: merge a root's classes into fewer when labels are read (``data.class_map``), root untouched.

A class map is a YAML mapping ``new_name: [old class names]``; new ids follow the order listed and classes
not listed become ignore (255). The same lookup table serves training, OOF scoring, blending, submissions
and the local scorer, so every stage sees the same merged labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from foldwise.classes import IGNORE_INDEX
from foldwise.io import read_text

# Shipped maps, found by bare name (``nyu13_to_6`` or ``nyu13_to_6.yaml``).
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "kfold" / "data" / "class_maps"


@dataclass(frozen=True)
class ClassMap:
    """A merge of ``source_classes`` into ``classes``.

    Args:
        classes: the new class names; the index is the new id.
        groups: new name -> the old names it merges.
        source_classes: the root's own class names.
        source: where the map came from (a file, or "manifest").
    """

    classes: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    source_classes: tuple[str, ...]
    source: str = ""

    @property
    def lut(self) -> np.ndarray:
        """uint8 (256,) lookup table: old id -> new id, unlisted classes and 255 -> 255."""
        table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        old_id = {name: i for i, name in enumerate(self.source_classes)}
        for new_id, name in enumerate(self.classes):
            for old in self.groups[name]:
                table[old_id[old]] = new_id
        return table

    def apply(self, label: np.ndarray) -> np.ndarray:
        """Merged labels of ``label`` (uint8 old ids or 255)."""
        return self.lut[label]

    def to_record(self) -> dict[str, Any]:
        """Plain data for a manifest or ``blend.json``: enough to rebuild the map without its file."""
        return {"groups": {k: list(v) for k, v in self.groups.items()}, "source_classes": list(self.source_classes),
                "source": self.source}


def class_map_from_groups(groups: Any, source_classes: tuple[str, ...], source: str) -> ClassMap:
    """Check ``groups`` (``{new_name: [old names]}``) against ``source_classes``; errors name ``source``."""
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{source}: expected a mapping 'new_name: [old class names]', got {type(groups).__name__}")
    seen: dict[str, str] = {}
    clean: dict[str, tuple[str, ...]] = {}
    for new, olds in groups.items():
        olds = [olds] if isinstance(olds, str) else olds
        if not isinstance(new, str) or not new.strip():  # YAML reads `1:` or `yes:` as a number or a bool
            raise ValueError(f"{source}: new class name {new!r} is not a name (quote it: '{new}')")
        if not isinstance(olds, list) or not olds:
            raise ValueError(f"{source}: class {new!r} needs a non-empty list of old class names")
        for old in olds:
            if not isinstance(old, str):
                raise ValueError(f"{source}: class {new!r} lists {old!r}, which is not a class name (quote it)")
            if old not in source_classes:
                raise ValueError(f"{source}: class {new!r} lists {old!r}, which is not a class of the root "
                                 f"({', '.join(source_classes)})")
            if old in seen:
                raise ValueError(f"{source}: {old!r} is merged into both {seen[old]!r} and {new!r}")
            seen[old] = new
        clean[new] = tuple(olds)
    if len(clean) >= IGNORE_INDEX:
        raise ValueError(f"{source}: {len(clean)} classes; at most {IGNORE_INDEX - 1} fit beside ignore")
    return ClassMap(tuple(clean), clean, tuple(source_classes), source)


def class_map_from_record(record: dict[str, Any] | None) -> ClassMap | None:
    """Rebuild a map from :meth:`ClassMap.to_record` (a manifest's ``class_map``); None stays None."""
    if not record:
        return None
    return class_map_from_groups(record["groups"], tuple(record["source_classes"]), record.get("source") or "manifest")


def resolve_class_map_path(name: str | Path) -> Path:
    """A class map file: the path as given, else a shipped map by bare name."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (SHIPPED_DIR / path.name, SHIPPED_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"{name}: class map not found (a YAML file, or a shipped one: {shipped})")


def read_class_map(name: str | Path, source_classes: tuple[str, ...]) -> ClassMap:
    """Read a class map file (or a shipped map by name) for a root with ``source_classes``."""
    path = resolve_class_map_path(name)
    try:
        groups = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    return class_map_from_groups(groups, source_classes, str(path))
