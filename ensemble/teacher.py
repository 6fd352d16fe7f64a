"""The teacher pass: one fold's targets for a distilled student, from the fold-k models of a finished blend.

For fold k every member's fold-k model (trained without fold k's images) predicts fold k's training images, and
the test images for ``distill.pseudo_test``, with its recipe's TTA as its fold stores were written
(``ensemble.predict``); the members are blended with the nested fold-k weights and temperatures (fit without
fold k). No model that saw fold k's labels, and no parameter fitted on them, shapes what the student's fold k
learns. The store's layout and its checks are ``kfold.store.teacher``'s; ``teacher.json`` is written last.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ensemble.bundle import BlendBundle, MemberBundle
from ensemble.predict import LoadedMember, load_models, predict_probs
from ensemble.record import BlendRecord
from ensemble.stores import blend_grid
from foldwise.io import write_json, write_text
from kfold.config import load_recipe
from kfold.data.layout import DataRoot, read_depth, read_rgb
from kfold.rundir import FoldLock
from kfold.store.format import MANIFEST, StoreError, load_manifest
from kfold.store.teacher import TEACHER_FORMAT, TEACHER_MANIFEST, TeacherError, file_entry, member_entry
from kfold.store.write import open_npy


def fold_teacher(record: BlendRecord, runs_dir: Path, fold: int, folds_sha256: str) -> BlendBundle:
    """The blend of fold k's teacher: each member's fold-k model only, with the nested fold-k parameters.

    Raises a one-line error naming the fold when the record has no nested parameters for it, or a member's
    fold k is not complete or was trained on another ``folds.csv``.
    """
    nested = {entry["fold"]: entry for entry in record.nested_folds}
    if fold not in nested:
        raise ValueError(f"fold {fold}: blend {record.name!r} has no nested parameters for fold {fold} (a record "
                         f"written before nested_folds, or a blend of other folds); run ensemble/blend.py again")
    members, image_size = [], None
    for name in record.members:
        run = Path(runs_dir) / name / f"fold{fold}"
        manifest = load_manifest(name, fold, run)
        if manifest.folds_sha256 != folds_sha256:
            raise StoreError(f"fold {fold}: {run / MANIFEST} was trained on another folds.csv than the data root's")
        # A member that is itself a student (a second round) is a fold-k model only if its own teacher was.
        leak = [m for m in (manifest.scores.get("teacher") or {}).get("members", []) if m["fold"] != fold]
        if leak:
            raise StoreError(f"fold {fold}: {run / MANIFEST} learnt from {leak[0]['experiment']} fold "
                             f"{leak[0]['fold']}, a model that saw fold {fold}'s images")
        members.append(MemberBundle(name, load_recipe(run / "config.yaml"), (run / "model.safetensors",),
                                    tuple(manifest.store_size)))
        image_size = tuple(manifest.image_size)
    return BlendBundle(record.name, tuple(record.classes), image_size,
                       np.asarray(nested[fold]["weights"], dtype=np.float64),
                       np.asarray(nested[fold]["temperatures"], dtype=np.float64), tuple(members),
                       record.class_map, folds_sha256)


def check_parameters(manifest: dict[str, Any], record: BlendRecord, fold: int, path: Path) -> None:
    """The teacher store was made from the blend's members and fold-k parameters as the record holds them now.

    The parameters, not the file's bytes: a blend fitted again to the same weights keeps its students' targets.
    """
    nested = {entry["fold"]: entry for entry in record.nested_folds}.get(fold, {})
    made = ([m["experiment"] for m in manifest["members"]], manifest["weights"], manifest["temperatures"])
    now = (list(record.members), nested.get("weights"), nested.get("temperatures"))
    if made != now:
        raise TeacherError(f"fold {fold}: {path} was made from blend {record.name!r} with members {made[0]}, "
                           f"fold-{fold} weights {made[1]} and temperatures {made[2]}; its record now holds "
                           f"{now[0]}, {now[1]}, {now[2]}")


def _predict_split(loaded: list[LoadedMember], blend: BlendBundle, root: DataRoot, split: str, ids: Sequence[str],
                   out: Path, device: torch.device, desc: str) -> None:
    grid = blend_grid([m.store_size for m in blend.members])
    needs_depth = any(m.recipe.data.in_channels == 4 for m in blend.members)
    batch = max(m.recipe.oof.batch_size for m in blend.members)
    with open_npy(out / f"{split}.npy", (len(ids), len(blend.classes), *grid)) as rows:
        for lo in tqdm(range(0, len(ids), batch), desc=desc, unit="batch", disable=not sys.stderr.isatty()):
            chunk = ids[lo : lo + batch]
            images = [read_rgb(root.image_path(split, i)) for i in chunk]
            depths = [read_depth(root.depth_path(split, i)) if needs_depth else None for i in chunk]
            with torch.inference_mode():
                rows[lo : lo + len(chunk)] = predict_probs(loaded, blend, images, depths, device).half().numpy()
    write_text(out / f"{split}_ids.txt", "".join(f"{i}\n" for i in ids))


def teacher_pass(record: BlendRecord, record_path: Path, runs_dir: Path, root: DataRoot, folds_sha256: str,
                 fold: int, train_ids: Sequence[str], with_test: bool, out: Path, device: str = "cpu",
                 wait: bool = False) -> dict[str, Any]:
    """Write fold k's teacher store into ``out`` (``runs/<student>/teacher/fold<k>``); return its manifest.

    Args:
        record / record_path: the teacher blend and its file (its digest is part of the provenance).
        runs_dir: where the blend's members are.
        root: the data root; ``folds_sha256`` its folds.csv digest (every member's fold k must share it).
        fold / train_ids: the student's fold and its training ids (the rows of ``train.npy``).
        with_test: also the test images (``distill.pseudo_test``).
        device: where the member models run.
        wait: when another process writes this store, wait for it instead of refusing.
    """
    blend = fold_teacher(record, runs_dir, fold, folds_sha256)
    lock = FoldLock(out).acquire(wait=wait)
    try:
        (out / TEACHER_MANIFEST).unlink(missing_ok=True)  # first: a crash below leaves no store that looks whole
        start = time.perf_counter()
        dev = torch.device(device)
        loaded = load_models(blend, dev)
        splits = {"train": list(train_ids), **({"test": list(root.test_ids)} if with_test else {})}
        for split, ids in splits.items():
            _predict_split(loaded, blend, root, split, ids, out, dev, f"teacher fold {fold} {split}")
        manifest = {
            "format": TEACHER_FORMAT, "blend": record.name, "fold": fold, "folds_sha256": folds_sha256,
            "record": file_entry(record_path), "members": [member_entry(runs_dir, m.name, fold) for m in blend.members],
            "weights": blend.weights.tolist(), "temperatures": blend.temperatures.tolist(),
            "classes": list(blend.classes), "store_size": list(blend_grid([m.store_size for m in blend.members])),
            "splits": list(splits), "n": {split: len(ids) for split, ids in splits.items()},
            "seconds": round(time.perf_counter() - start, 2),
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json(out / TEACHER_MANIFEST, manifest)
        return manifest
    finally:
        lock.release()
