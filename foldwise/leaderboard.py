"""The leaderboard's schema and its one row builder, shared by experiment reports (kfold) and blends (ensemble).

``submissions.leaderboard`` keeps the CSV (upsert, rank, print); rows are built only here, so an experiment's
row and a blend's row cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

HEAD = ("name", "kind", "members", "weights", "temperatures", "oof_miou", "oof_miou_nested", "oof_miou_selected",
        "pixel_acc")
DEPTH = ("depth_rmse", "depth_absrel", "depth_delta1")  # OOF depth in metres vs the sensor, when a model has a head
TAIL = ("submission", "created", "notes", "trackers", "public_lb")
KINDS = ("experiment", "blend")


def _number(value: Any) -> float | None:
    value = None if value is None else float(value)
    return None if value is None or math.isnan(value) else value


def leaderboard_row(*, name: str, kind: str, members: str | Sequence[str], oof_miou: float, oof_miou_nested: float,
                    pixel_acc: float, per_class_iou: Mapping[str, float], weights: Any = "1", temperatures: Any = "1",
                    depth: Mapping[str, float] | None = None, submission: str = "", created: str | None = None,
                    notes: str = "", trackers: str = "", oof_miou_selected: float | None = None) -> dict[str, Any]:
    """One leaderboard row.

    Args:
        name / kind: the experiment or blend, ``"experiment"`` or ``"blend"``.
        members: the blend's experiments (an experiment: its own name).
        oof_miou / oof_miou_nested / pixel_acc: OOF scores; an experiment fits nothing on its OOF, so its nested
            score is its in-sample one.
        per_class_iou: class name -> OOF IoU (nan or None where the class never occurs).
        weights / temperatures: the blend's (an experiment: "1").
        depth: ``{"rmse", "absrel", "delta1"}`` in metres against the sensor, when the models predict depth.
        submission / created: the submission CSV written, and when (default: now).
        notes: what a reader of the row must know (members a blend left out).
        oof_miou_selected: the best trial of a search: its selection-corrected OOF mIoU (``kfold.search``).
        trackers: where its curves are (``kfold.track.tracker_links``: MLflow run id, W&B group, TensorBoard folder).
    """
    if kind not in KINDS:
        raise ValueError(f"leaderboard row {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return {
        "name": name, "kind": kind, "members": members, "weights": weights, "temperatures": temperatures,
        "oof_miou": _number(oof_miou), "oof_miou_nested": _number(oof_miou_nested),
        "oof_miou_selected": _number(oof_miou_selected), "pixel_acc": _number(pixel_acc),
        **{f"depth_{k}": _number(v) for k, v in (depth or {}).items()},
        **{f"iou_{c}": _number(v) for c, v in per_class_iou.items()},
        "submission": submission, "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
        "notes": notes, "trackers": trackers,
    }
