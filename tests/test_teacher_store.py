"""Teacher stores refuse what would leak or no longer hold, in one line naming the fold; the student's flags stay
out of its fold jobs; the recovered share is defined only where the blend gains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from faults.stores import write_store

from ensemble.distill import _without
from ensemble.distill_report import recovered
from ensemble.record import BlendRecord
from ensemble.teacher import check_parameters, fold_teacher
from foldwise.io import write_json
from kfold.data.layout import open_root
from kfold.splits import folds_sha256
from kfold.store.format import StoreError
from kfold.store.teacher import TeacherError, check_teacher, file_entry, member_entry, open_teacher

TRAIN_IDS = ["a", "b", "c"]


def fake_store(tmp_path: Path, fold: int = 1) -> tuple[Path, Path, Path]:
    """runs/m1/fold<k> with its two files, a blend record and runs/student/teacher/fold<k>."""
    runs = tmp_path / "runs"
    member = runs / "m1" / f"fold{fold}"
    member.mkdir(parents=True)
    (member / "model.safetensors").write_bytes(b"weights")
    (member / "config.yaml").write_text("recipe: {}\n")
    record = tmp_path / "subs" / "b.json"
    record.parent.mkdir()
    record.write_text("{}")
    folder = runs / "student" / "teacher" / f"fold{fold}"
    folder.mkdir(parents=True)
    np.save(folder / "train.npy", np.full((3, 2, 4, 4), 0.5, dtype=np.float16))
    (folder / "train_ids.txt").write_text("".join(f"{i}\n" for i in TRAIN_IDS))
    write_json(folder / "teacher.json", {"format": 1, "blend": "b", "fold": fold, "record": file_entry(record),
                                         "members": [member_entry(runs, "m1", fold)], "splits": ["train"],
                                         "weights": [1.0], "temperatures": [0.9]})
    return runs, record, folder


def test_a_store_that_holds_opens(tmp_path: Path) -> None:
    runs, record, folder = fake_store(tmp_path)
    assert check_teacher(folder, 1, "b", TRAIN_IDS, False, runs)["fold"] == 1
    targets = open_teacher(folder, 1, "b", TRAIN_IDS, False, runs)
    assert targets.probs("train", "b").dtype == np.float32 and targets.probs("train", "b").shape == (2, 4, 4)


@pytest.mark.parametrize("breakage, message", [
    ("member", "fold 1: .*runs/m1/fold1/model.safetensors \\(member m1, sha256 .*changed since"),
    ("fold", "fold 1: .*holds fold 0's teacher targets"),
    ("leak", "fold 1: .*names m1 fold 0, a model that saw fold 1's images"),
    ("blend", "fold 1: .*holds the targets of blend 'b'; distill.teacher is 'other'"),
    ("ids", "fold 1: .*train_ids.txt is not fold 1's training ids"),
    ("test", "fold 1: .*has no test targets"),
    ("missing", "fold 1: no teacher targets at"),
])
def test_broken_provenance_is_refused_naming_the_fold(tmp_path: Path, breakage: str, message: str) -> None:
    runs, record, folder = fake_store(tmp_path)
    manifest = json.loads((folder / "teacher.json").read_text())
    blend, ids, needs_test = "b", TRAIN_IDS, False
    if breakage == "member":
        (runs / "m1" / "fold1" / "model.safetensors").write_bytes(b"retrained")
    elif breakage in ("fold", "leak"):
        manifest["fold" if breakage == "fold" else "members"] = 0 if breakage == "fold" else [
            {**manifest["members"][0], "fold": 0}]
        write_json(folder / "teacher.json", manifest)
    elif breakage == "blend":
        blend = "other"
    elif breakage == "ids":
        ids = ["a", "b", "d"]
    elif breakage == "test":
        needs_test = True
    else:
        (folder / "teacher.json").unlink()
    with pytest.raises(TeacherError, match=message) as err:
        check_teacher(folder, 1, blend, ids, needs_test, runs)
    assert "\n" not in str(err.value)


def test_a_blend_fitted_again_keeps_its_students_targets_only_with_the_same_parameters(tmp_path: Path) -> None:
    _, _, folder = fake_store(tmp_path)
    manifest = json.loads((folder / "teacher.json").read_text())
    nested = [{"fold": 1, "weights": [1.0], "temperatures": [0.9]}]
    check_parameters(manifest, BlendRecord(name="b", members=["m1"], nested_folds=nested), 1, folder)
    moved = [{"fold": 1, "weights": [1.0], "temperatures": [1.1]}]
    with pytest.raises(TeacherError, match="fold 1: .*temperatures \\[0.9\\]; its record now holds .*\\[1.1\\]"):
        check_parameters(manifest, BlendRecord(name="b", members=["m1"], nested_folds=moved), 1, folder)


def test_the_students_own_flags_stay_out_of_its_fold_jobs_and_the_baseline_drops_distill_keys() -> None:
    argv = ["--baseline", "--submissions", "subs", "--fold", "0", "--opts", "distill.teacher", "t", "optim.lr",
            "0.01", "--teacher-device=cpu", "--launcher", "local"]
    assert _without(argv, False) == ["--fold", "0", "--opts", "distill.teacher", "t", "optim.lr", "0.01",
                                     "--launcher", "local"]
    assert _without(argv, True) == ["--fold", "0", "--opts", "optim.lr", "0.01", "--launcher", "local"]
    assert _without(["--opts", "distill.alpha", "2"], True) == []


def test_the_recovered_share_needs_a_gain() -> None:
    assert recovered(0.6, 0.5, 0.7) == pytest.approx(0.5)
    assert recovered(0.8, 0.5, 0.7) == pytest.approx(1.5)  # beyond its teacher: more than all of it
    assert recovered(0.6, 0.5, 0.5) is None and recovered(0.6, 0.5, 0.4) is None


def test_a_second_round_member_taught_by_another_fold_is_refused(synthetic_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    student = write_store(runs, "student1", synthetic_root, seed=3)
    manifest_path = student / "fold2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["teacher"] = {"members": [{"experiment": "exp_a", "fold": 0, "sha256": {}}]}  # taught by fold 0
    write_json(manifest_path, manifest)
    record = BlendRecord(name="round2", members=["student1"], nested_folds=[{"fold": 2, "weights": [1.0],
                                                                           "temperatures": [1.0]}])
    with pytest.raises(StoreError, match="fold 2: .*learnt from exp_a fold 0, a model that saw fold 2's images"):
        fold_teacher(record, runs, 2, folds_sha256(open_root(synthetic_root)))


def test_a_broken_store_file_is_one_line_naming_it(tmp_path: Path) -> None:
    runs, _, folder = fake_store(tmp_path)
    (folder / "train.npy").write_bytes((folder / "train.npy").read_bytes()[:100])  # truncated
    with pytest.raises(TeacherError, match="fold 1: .*train.npy unreadable"):
        open_teacher(folder, 1, "b", TRAIN_IDS, False, runs)
    write_json(folder / "teacher.json", {"format": 1, "fold": 1})
    with pytest.raises(TeacherError, match="fold 1: .*teacher.json has no key 'blend'"):
        open_teacher(folder, 1, "b", TRAIN_IDS, False, runs)
