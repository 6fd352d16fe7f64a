"""A finished blend as the files it predicts with: each member's recipe and fold weights, the blend's weights
and temperatures. Opened from ``runs/`` + ``submissions/NAME.json``, or from a folder ``ensemble.export`` wrote.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ensemble.record import read_blend_record
from foldwise.io import sha256_file
from kfold.config import Recipe, from_dict, load_recipe, to_dict
from kfold.store.read import open_experiment

EXPORT_FORMAT = 1
BLEND_FILE = "blend.json"


@dataclass(frozen=True)
class MemberBundle:
    """One member: its resolved recipe, its fold models' weights (fold order) and its store size."""

    name: str
    recipe: Recipe
    weights_files: tuple[Path, ...]
    store_size: tuple[int, int]


@dataclass(frozen=True)
class BlendBundle:
    """A blend: members, weights (per model, or per model and class), temperatures, classes, image size."""

    name: str
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    weights: np.ndarray
    temperatures: np.ndarray
    members: tuple[MemberBundle, ...]
    class_map: dict[str, Any] | None = None
    folds_sha256: str = ""

    def with_tta_scales(self, scales: tuple[float, ...]) -> BlendBundle:
        """The same blend with every member's TTA scales replaced (``--tta-scales``)."""
        members = []
        for m in self.members:
            recipe = from_dict(to_dict(m.recipe))
            recipe.tta.scales = tuple(float(s) for s in scales)
            members.append(dataclasses.replace(m, recipe=recipe))
        return dataclasses.replace(self, members=tuple(members))


def open_from_runs(record_path: Path, runs_dir: Path) -> BlendBundle:
    """The blend of ``submissions/NAME.json`` with its members' fold models under ``runs_dir``."""
    record = read_blend_record(Path(record_path))
    members = []
    for name in record.members:
        store = open_experiment(runs_dir, name)
        files = tuple(fa.path / "model.safetensors" for fa in store.fold_arrays)
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"{missing}: fold weights not found (needed by blend {record.name!r})")
        recipe = load_recipe(store.fold_arrays[0].path / "config.yaml")
        members.append(MemberBundle(name, recipe, files, tuple(store.store_size)))
        image_size, folds_sha256 = tuple(store.image_size), store.folds_sha256
    return BlendBundle(record.name, tuple(record.classes), image_size,
                       np.asarray(record.weights, dtype=np.float64),
                       np.asarray(record.temperatures, dtype=np.float64), tuple(members),
                       record.class_map, folds_sha256)


def open_export(folder: Path) -> BlendBundle:
    """A folder written by ``ensemble.export``; every file must match the digest ``blend.json`` records."""
    folder = Path(folder)
    record_path = folder / BLEND_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path}: not an exported blend (no {BLEND_FILE})")
    try:
        record = json.loads(record_path.read_text())
        entries = record["members"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{record_path}: not a valid export record ({err})") from None
    if record.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{record_path}: export format {record.get('format')!r}, this version reads {EXPORT_FORMAT}")
    members = []
    for entry in entries:
        for item in [entry["recipe"], *entry["folds"]]:
            path = folder / item["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing from the export ({BLEND_FILE} lists it)")
            if sha256_file(path) != item["sha256"]:
                raise ValueError(f"{path}: sha256 differs from the one {BLEND_FILE} records (corrupted or replaced)")
        recipe = from_dict(yaml.safe_load((folder / entry["recipe"]["file"]).read_text()))
        files = tuple(folder / f["file"] for f in entry["folds"])
        members.append(MemberBundle(entry["name"], recipe, files, tuple(entry["store_size"])))
    return BlendBundle(record["name"], tuple(record["classes"]), tuple(record["image_size"]),
                       np.asarray(record["weights"], dtype=np.float64),
                       np.asarray(record["temperatures"], dtype=np.float64), tuple(members),
                       record.get("class_map"), record.get("folds_sha256", ""))
