"""The blend record: what ``submissions/<name>.json`` holds, written by ``ensemble/blend.py`` and read by the
report, the predictor and the export.

One dataclass with one writer (:meth:`BlendRecord.write`) and one reader (:func:`read_blend_record`); the JSON
keeps the layout it has always had (``global`` is a Python keyword, hence the field ``global_``), so records
written before the dataclass still load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldwise.io import read_json_object, write_json

Scores = dict[str, Any]  # {"miou", "pixel_acc", "per_class_iou": {class: IoU}}
REQUIRED = ("members", "weights", "temperatures", "classes")


@dataclass
class BlendRecord:
    """One blend: its members and parameters, the scores that justify it, and where its submission is.

    Args:
        name: the blend's name (``<name>.csv``, ``<name>.json``).
        members: experiment names, in the order of ``weights`` and ``temperatures``.
        classes: class names (the merged ones under a class map).
        weights: ``(M,)`` weights, or ``(M, C)`` per model and class.
        temperatures: ``(M,)`` temperatures.
        oof / nested: in-sample and nested-CV OOF scores of the chosen blend at label resolution.
        nested_folds: per held-out fold, the parameters fitted without it and its full-resolution held-out
            confusion matrix and mIoU (``confusion_heldout``, ``miou_heldout``: what ``ensemble.compare`` pairs).
        member_scores: each member alone, OOF.
        global_: a per-class fit's starting global blend (weights, temperatures, oof, nested), else None.
        test: the local test score when the root has test labels, else None.
        left_out: experiments ``--skip-broken`` left out, each with why.

    Fields are in the file's key order.
    """

    name: str = ""
    method: str = "slsqp"
    per_class: bool = False
    members: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    folds: int = 0
    class_map: dict[str, Any] | None = None
    weights: list[Any] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    chosen: str = ""
    moved: bool = False
    start_miou_sample: float = float("nan")
    candidates_sample: dict[str, float] = field(default_factory=dict)
    fit_message: str = ""
    n_evals: int = 0
    oof: Scores = field(default_factory=dict)
    nested: Scores = field(default_factory=dict)
    nested_folds: list[dict[str, Any]] = field(default_factory=list)
    member_scores: dict[str, Scores] = field(default_factory=dict)
    global_: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    sample_pixels: int = 0
    seed: int = 0
    order: str = "C"
    submission: str = ""
    written: bool = False
    data_root: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    created: str = ""
    left_out: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-able data, in the file's key order (NaN becomes null)."""
        data = {("global" if f.name == "global_" else f.name): getattr(self, f.name)
                for f in dataclasses.fields(self)}
        return json.loads(json.dumps(data, default=float), parse_constant=lambda _: None)

    def write(self, path: Path) -> None:
        """Write ``<name>.json`` atomically."""
        write_json(path, self.to_json())


_FIELDS = {("global" if f.name == "global_" else f.name): f.name for f in dataclasses.fields(BlendRecord)}


def read_blend_record(path: Path) -> BlendRecord:
    """Read ``submissions/<name>.json``; one-line errors name the file and the key.

    Keys this version does not know are ignored and keys an older record lacks take their defaults, so only
    what a blend predicts with (members, weights, temperatures, classes) is required.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: blend record not found (ensemble/blend.py writes submissions/NAME.json)")
    data = read_json_object(path)
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: no key {missing[0]!r}; is this a blend record?")
    values = {_FIELDS[k]: v for k, v in data.items() if k in _FIELDS}
    values.setdefault("name", path.stem)
    return BlendRecord(**values)
