"""The teacher store: a distilled student's targets for one fold, and the provenance that makes them leak-free.

```
runs/<student>/teacher/fold<k>/
  train.npy, train_ids.txt   float16 (N, C, h, w): the fold-k teacher's probabilities on fold k's training images
  test.npy, test_ids.txt     the same on the test images (distill.pseudo_test)
  teacher.json               written last: the blend, its fold-k weights and temperatures, the fold, the sha256
                             of the blend record and of every member file the targets came from (each member's
                             fold-k model and recipe, found under the runs folder: a moved runs folder keeps
                             its provenance)
```

The teacher of fold k is every member's fold-k model (none of them saw fold k's images), weighted by the blend's
nested fold-k parameters (fit without fold k). ``ensemble.teacher`` writes the store; the student's fold reads it
here and refuses one whose provenance does not hold: another fold's, another blend's, or one made from a member
file that has changed since (and ``ensemble.teacher`` one made with other blend parameters than the record's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foldwise.io import read_json_object, sha256_file
from kfold.store.format import StoreError, read_ids

TEACHER_DIR = "teacher"
TEACHER_MANIFEST = "teacher.json"
TEACHER_FORMAT = 1
MEMBER_FILES = ("model.safetensors", "config.yaml")  # what makes a member's fold-k predictions what they are


class TeacherError(StoreError):
    """A teacher store that is missing or would break the provenance rule; the message names fold and file."""


def teacher_dir(out: str | Path, student: str, fold: int) -> Path:
    """``<out>/<student>/teacher/fold<k>``."""
    return Path(out) / student / TEACHER_DIR / f"fold{fold}"


def file_entry(path: Path) -> dict[str, str]:
    """``{"path", "sha256"}`` of a file the targets depend on."""
    return {"path": str(path), "sha256": sha256_file(path)}


def member_entry(runs_dir: Path, experiment: str, fold: int) -> dict[str, Any]:
    """A member's fold-k files as the manifest records them: by digest, found under the runs folder (which may move)."""
    run = Path(runs_dir) / experiment / f"fold{fold}"
    return {"experiment": experiment, "fold": fold, "sha256": {f: sha256_file(run / f) for f in MEMBER_FILES}}


def _changed(fold: int, manifest_path: Path, path: Path, sha256: str, what: str) -> str | None:
    if not path.is_file():
        return f"fold {fold}: {manifest_path} was made from {path} ({what}), which is gone"
    now = sha256_file(path)
    if now != sha256:
        return (f"fold {fold}: {manifest_path} was made from {path} ({what}, sha256 {sha256[:12]}), which has "
                f"changed since (now {now[:12]})")
    return None


def check_teacher(folder: Path, fold: int, blend: str, train_ids: Sequence[str], needs_test: bool, runs_dir: Path
                  ) -> dict[str, Any]:
    """The teacher store's manifest, once every provenance rule holds; else :class:`TeacherError` in one line.

    Args:
        folder: ``runs/<student>/teacher/fold<k>``.
        fold: the student's fold k: the store must hold fold k's targets from fold-k member models only.
        blend: the teacher blend the recipe names (``distill.teacher``).
        train_ids: fold k's training ids, in the root's order (a changed ``folds.csv`` changes them).
        needs_test: the recipe pseudo-labels the test images.
        runs_dir: where the members are (their files must be the ones the targets came from).

    The blend's parameters are checked against its record by ``ensemble.teacher.check_parameters`` (the record
    is the ensemble's format), before any fold job starts.
    """
    path = folder / TEACHER_MANIFEST
    if not path.is_file():
        raise TeacherError(f"fold {fold}: no teacher targets at {path} (the teacher pass of ensemble.distill "
                           f"writes them before the fold trains)")
    manifest = read_json_object(path)
    missing = [key for key in ("blend", "fold", "record", "members", "splits") if key not in manifest]
    if missing:
        raise TeacherError(f"fold {fold}: {path} has no key {missing[0]!r}; is it a teacher store's manifest?")
    if manifest.get("format") != TEACHER_FORMAT:
        raise TeacherError(f"fold {fold}: {path}: teacher store format {manifest.get('format')!r}, this version "
                           f"reads {TEACHER_FORMAT}")
    if manifest.get("fold") != fold:
        raise TeacherError(f"fold {fold}: {path} holds fold {manifest.get('fold')}'s teacher targets, not fold "
                           f"{fold}'s")
    if manifest.get("blend") != blend:
        raise TeacherError(f"fold {fold}: {path} holds the targets of blend {manifest.get('blend')!r}; "
                           f"distill.teacher is {blend!r}")
    other = [m for m in manifest["members"] if m["fold"] != fold]
    if other:
        raise TeacherError(f"fold {fold}: {path} names {other[0]['experiment']} fold {other[0]['fold']}, a model "
                           f"that saw fold {fold}'s images")
    for member in manifest["members"]:  # hashed one by one: the first change found is the error
        for name, digest in member["sha256"].items():
            problem = _changed(fold, path, Path(runs_dir) / member["experiment"] / f"fold{fold}" / name, digest,
                               f"member {member['experiment']}")
            if problem:
                raise TeacherError(problem)
    if read_ids(folder / "train_ids.txt") != list(train_ids):
        raise TeacherError(f"fold {fold}: {folder / 'train_ids.txt'} is not fold {fold}'s training ids "
                           f"(folds.csv changed since the teacher pass?)")
    if needs_test and "test" not in manifest["splits"]:
        raise TeacherError(f"fold {fold}: {path} has no test targets; distill.pseudo_test needs them")
    return manifest


@dataclass
class TeacherTargets:
    """One fold's teacher probabilities, memory-mapped: ``probs(split, id)`` is float32 (C, h, w).

    Args:
        folder: the store.
        fold: the fold they are for.
        manifest: ``teacher.json``.
        arrays: split -> (N, C, h, w) float16 memory map.
        rows: split -> id -> row.
    """

    folder: Path
    fold: int
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]
    rows: dict[str, dict[str, int]]

    def probs(self, split: str, image_id: str) -> np.ndarray:
        return np.asarray(self.arrays[split][self.rows[split][image_id]], dtype=np.float32)

    def ids(self, split: str) -> list[str]:
        return list(self.rows[split])

    def citation(self) -> dict[str, Any]:
        """What the student's fold manifest records of its teacher: the store, its digest, every member file."""
        path = self.folder / TEACHER_MANIFEST
        return {"store": str(path.resolve()), "sha256": sha256_file(path), "blend": self.manifest["blend"],
                "record": self.manifest["record"], "members": self.manifest["members"]}


def open_teacher(folder: Path, fold: int, blend: str, train_ids: Sequence[str], needs_test: bool,
                 runs_dir: Path) -> TeacherTargets:
    """Check (:func:`check_teacher`) and open one fold's teacher store."""
    manifest = check_teacher(folder, fold, blend, train_ids, needs_test, runs_dir)
    arrays, rows = {}, {}
    for split in manifest["splits"]:
        ids = read_ids(folder / f"{split}_ids.txt")
        try:
            array = np.load(folder / f"{split}.npy", mmap_mode="r")
        except (OSError, ValueError) as err:  # truncated or not an .npy: numpy's message names no file
            raise TeacherError(f"fold {fold}: {folder / f'{split}.npy'} unreadable ({err}); --retrain makes it "
                               f"again") from None
        if array.shape[0] != len(ids) or array.ndim != 4:
            raise TeacherError(f"fold {fold}: {folder / f'{split}.npy'} has shape {array.shape} for {len(ids)} ids")
        arrays[split], rows[split] = array, {image_id: i for i, image_id in enumerate(ids)}
    return TeacherTargets(folder, fold, manifest, arrays, rows)


