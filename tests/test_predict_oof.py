"""Fold prediction (OOF/test stores, temperature table, manifest) and the experiment OOF store and report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kfold.config import build_recipe
from kfold.data.layout import open_root, read_label
from kfold.data.synthetic import generate
from kfold.models import build_model
from kfold.report import POOLED, experiment_report
from kfold.splits import ensure_folds, folds_sha256, read_folds
from kfold.store.format import StoreError, list_experiments, store_size
from kfold.store.read import open_experiment, score_experiment
from kfold.store.write import predict_fold

H, W, K, EXP = 48, 64, 3, "exp_tiny"
GRID = (0.7, 0.8, 0.85, 0.9, 1.0)  # the recipe's grid plus the stored temperature 0.85
STORED_T = 0.85


def _recipe():
    return build_recipe({}, preset="smoke", opts={
        "data.input_size": (H, W), "data.num_workers": 0, "tta.scales": (1.0,), "tta.hflip": False,
        "tta.temperature": STORED_T,
        "oof.batch_size": 4, "tta.max_batch": 8,
    })


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("fpn", "resnet18", None, 3, 13, depth_head=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("h8")
    root = open_root(generate(base / "data", n_train=12, n_test=3, size=(H, W), seed=0, views_per_room=2,
                              progress=False))
    ensure_folds(root, k=K, seed=0)
    folds = read_folds(root)
    sha = folds_sha256(root)
    runs = base / "runs"
    metrics = {}
    for fold in range(K):
        val_ids = [i for i in root.train_ids if folds[i] == fold]
        metrics[fold] = predict_fold(_model(fold), _recipe(), root, fold, val_ids, runs / EXP / f"fold{fold}",
                                     torch.device("cpu"), sha, EXP)
    return {"root": root, "folds": folds, "runs": runs, "sha": sha, "metrics": metrics}


@pytest.fixture
def runs_copy(setup: dict, tmp_path: Path) -> Path:
    """A private copy of the runs folder for tests that break it."""
    return shutil.copytree(setup["runs"], tmp_path / "runs")


def test_store_size_rounds_the_scaled_image() -> None:
    assert store_size((240, 320), 0.5) == (120, 160)
    assert store_size((45, 63), 0.5) == (22, 32)  # round half to even, never 0
    assert store_size((1, 1), 0.1) == (1, 1)


def test_fold_files(setup: dict) -> None:
    root, folds = setup["root"], setup["folds"]
    h, w = H // 2, W // 2
    for fold in range(K):
        d = setup["runs"] / EXP / f"fold{fold}"
        oof = np.load(d / "oof.npy", mmap_mode="r")
        test = np.load(d / "test.npy", mmap_mode="r")
        ids = (d / "oof_ids.txt").read_text().split()
        assert oof.dtype == np.float16 and test.dtype == np.float16
        assert oof.shape == (len(ids), 13, h, w) and test.shape == (3, 13, h, w)
        assert sorted(ids) == sorted(i for i, f in folds.items() if f == fold)
        assert (d / "test_ids.txt").read_text().split() == list(root.test_ids)
        for arr in (oof, test):
            sums = np.asarray(arr, dtype=np.float32).sum(axis=1)
            assert np.abs(sums - 1).max() < 1e-2
            assert np.asarray(arr).min() >= 0
        table = (d / "oof_temperature.csv").read_text().splitlines()
        assert table[0] == "temperature,miou,pixel_acc"
        assert [float(r.split(",")[0]) for r in table[1:]] == list(GRID)
        cms = np.load(d / "oof_temperature_cm.npy")
        n_labelled = sum(int((read_label(root.label_path("train", i), 13) != 255).sum()) for i in ids)
        assert cms.shape == (len(GRID), 13, 13) and (cms.sum(axis=(1, 2)) == n_labelled).all()
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["fold"] == fold and manifest["experiment"] == EXP
        assert manifest["store_size"] == [h, w] and manifest["image_size"] == [H, W]
        assert manifest["oof"]["shape"] == list(oof.shape) and manifest["test"]["n"] == 3
        assert manifest["tta"] == {"scales": [1.0], "hflip": False, "temperature": STORED_T}
        assert manifest["folds_sha256"] == setup["sha"] and manifest["dtype"] == "float16"
        assert manifest["oof_miou"] == pytest.approx(setup["metrics"][fold]["oof_miou"])
        assert manifest["oof_depth"]["rmse"] > 0
        # the manifest is written last and no temporary file is left behind
        others = [p for p in d.iterdir() if p.name != "manifest.json"]
        assert all(p.stat().st_mtime_ns <= (d / "manifest.json").stat().st_mtime_ns for p in others)
        assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_predict_fold_refuses_wrong_ids_or_folds(setup: dict, tmp_path: Path) -> None:
    root, folds = setup["root"], setup["folds"]
    val = [i for i in root.train_ids if folds[i] == 0]
    with pytest.raises(ValueError, match="not fold 0's"):
        predict_fold(_model(0), _recipe(), root, 0, val[:-1], tmp_path / "f0", torch.device("cpu"), setup["sha"], EXP)
    with pytest.raises(ValueError, match="folds changed"):
        predict_fold(_model(0), _recipe(), root, 0, val, tmp_path / "f0", torch.device("cpu"), "0" * 64, EXP)


def test_crash_mid_rewrite_leaves_no_complete_manifest(setup: dict, runs_copy: Path) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    root, folds = setup["root"], setup["folds"]
    fold_dir = runs_copy / EXP / "fold1"
    before = (fold_dir / "oof.npy").read_bytes()
    val = [i for i in root.train_ids if folds[i] == 1]
    with pytest.raises(RuntimeError, match="boom"):
        predict_fold(Broken(), _recipe(), root, 1, val, fold_dir, torch.device("cpu"), setup["sha"], EXP)
    assert not (fold_dir / "manifest.json").exists()
    assert (fold_dir / "oof.npy").read_bytes() == before  # the old file is untouched, no half file
    assert not [p for p in fold_dir.iterdir() if p.name.startswith(".")]
    with pytest.raises(StoreError, match="fold 1: .*fold1/manifest.json missing"):
        open_experiment(runs_copy, EXP)


def test_open_experiment_covers_every_train_id_once(setup: dict) -> None:
    root, folds = setup["root"], setup["folds"]
    assert list_experiments(setup["runs"]) == [EXP]
    store = open_experiment(setup["runs"], EXP)
    assert store.ids == root.train_ids and store.fold_of == folds and store.folds == K
    assert store.store_size == (H // 2, W // 2) and store.image_size == (H, W)
    assert store.test_ids == root.test_ids and store.folds_sha256 == setup["sha"]
    raw = {f: np.load(setup["runs"] / EXP / f"fold{f}" / "oof.npy") for f in range(K)}
    seen = []
    for ids, probs in store.iter_oof(chunk=5):
        assert probs.dtype == np.float32 and len(probs) <= 5
        for i, p in zip(ids, probs):
            fold, row = store.oof_index[i]
            np.testing.assert_array_equal(p, raw[fold][row].astype(np.float32))
        seen += ids
    assert seen == list(root.train_ids)
    ids, probs = next(store.iter_oof(ids=["r0003_v1", "r0000_v0"]))
    assert ids == ["r0003_v1", "r0000_v0"]
    np.testing.assert_array_equal(probs[1], raw[folds["r0000_v0"]][store.oof_index["r0000_v0"][1]])
    tests = [np.load(setup["runs"] / EXP / f"fold{f}" / "test.npy").astype(np.float32) for f in range(K)]
    ids, mean = zip(*store.iter_test(chunk=2))
    assert sum(ids, []) == list(root.test_ids)
    np.testing.assert_allclose(np.concatenate(mean), np.mean(tests, axis=0), rtol=1e-6)
    assert open_experiment(setup["runs"], EXP, k=K).folds == K
    with pytest.raises(StoreError, match="expected 4 folds"):
        open_experiment(setup["runs"], EXP, k=4)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_manifest_names_the_fold(runs_copy: Path) -> None:
    (runs_copy / EXP / "fold2" / "manifest.json").unlink()
    with pytest.raises(StoreError) as err:
        open_experiment(runs_copy, EXP)
    assert _one_line(err).startswith(f"{EXP} fold 2: ")
    assert "fold2/manifest.json missing (fold not complete)" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("folds_sha256", "f" * 64, "fold 2: .*folds_sha256 .* differs from fold 0's"),
        ("status", "running", "fold 2: .*status 'running' \\(fold not complete\\)"),
        ("store_size", [12, 16], "fold 2: .*store_size"),
    ],
)
def test_inconsistent_fold_is_refused(runs_copy: Path, key: str, value: object, match: str) -> None:
    path = runs_copy / EXP / "fold2" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[key] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=match) as err:
        open_experiment(runs_copy, EXP)
    _one_line(err)


def test_id_in_two_folds_and_bad_arrays_are_refused(runs_copy: Path) -> None:
    d0, d1 = runs_copy / EXP / "fold0", runs_copy / EXP / "fold1"
    ids0 = (d0 / "oof_ids.txt").read_text().split()
    ids1 = (d1 / "oof_ids.txt").read_text().split()
    (d1 / "oof_ids.txt").write_text("\n".join([ids0[0], *ids1[1:]]) + "\n")
    with pytest.raises(StoreError, match=f"fold 1: id '{ids0[0]}' .* also in fold 0"):
        open_experiment(runs_copy, EXP)
    (d1 / "oof_ids.txt").write_text("\n".join(ids1) + "\n")
    np.save(d1 / "test.npy", np.zeros((3, 13, 4, 4), dtype=np.float16))
    with pytest.raises(StoreError, match="fold 1: .*test.npy shape"):
        open_experiment(runs_copy, EXP)
    (d1 / "test.npy").unlink()
    with pytest.raises(StoreError, match="fold 1: .*test.npy missing"):
        open_experiment(runs_copy, EXP)


def test_nan_in_a_store_names_fold_and_id(setup: dict, runs_copy: Path) -> None:
    d = runs_copy / EXP / "fold1"
    ids = (d / "oof_ids.txt").read_text().split()
    oof = np.load(d / "oof.npy", mmap_mode="r+")
    oof[1, 3, 2, 2] = np.nan
    oof.flush()
    del oof
    store = open_experiment(runs_copy, EXP)  # structure is fine: values are checked while reading
    with pytest.raises(StoreError) as err:
        store.check_values(chunk=4)
    assert f"{EXP} fold 1: " in _one_line(err) and f"row 1 (id {ids[1]!r}): NaN" in str(err.value)
    with pytest.raises(StoreError, match=f"fold 1: .*{ids[1]}"):
        score_experiment(store, setup["root"])
    test = np.load(d / "test.npy", mmap_mode="r+")
    test[:] = 0
    test.flush()
    del test
    with pytest.raises(StoreError, match="fold 1: .*test.npy row 0 .*class sums away from 1"):
        for _ in open_experiment(runs_copy, EXP).iter_test(check=True):
            pass


def test_score_experiment_matches_in_ram_computation(setup: dict) -> None:
    root = setup["root"]
    store = open_experiment(setup["runs"], EXP)
    got = score_experiment(store, root, chunk=5)
    # In RAM: every fold's array at once, one interpolate, a bincount confusion matrix.
    probs, labels = [], []
    for f in range(K):
        d = setup["runs"] / EXP / f"fold{f}"
        probs.append(torch.from_numpy(np.load(d / "oof.npy").astype(np.float32)))
        labels += [read_label(root.label_path("train", i), 13) for i in (d / "oof_ids.txt").read_text().split()]
    pred = F.interpolate(torch.cat(probs), size=(H, W), mode="bilinear", align_corners=False).argmax(1).numpy()
    lab = np.stack(labels).astype(np.int64)
    keep = lab != 255
    cm = np.bincount(lab[keep] * 13 + pred[keep], minlength=169).reshape(13, 13)
    np.testing.assert_array_equal(got["confusion_matrix"], cm)
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm)).clip(min=1)
    present = (cm.sum(0) + cm.sum(1)) > 0
    assert got["miou"] == pytest.approx(iou[present].mean())
    assert got["pixel_acc"] == pytest.approx(np.trace(cm) / cm.sum())
    # the folds' confusion matrices at the stored temperature, pooled, are the same matrix
    pooled = sum(np.load(setup["runs"] / EXP / f"fold{f}" / "oof_temperature_cm.npy")[GRID.index(STORED_T)]
                 for f in range(K))
    np.testing.assert_array_equal(pooled, cm)
    sharper = score_experiment(store, root, temperature=0.5)
    assert sharper["temperature"] == 0.5 and sharper["confusion_matrix"].sum() == cm.sum()


def test_experiment_report_writes_table_plots_and_leaderboard_row(setup: dict, runs_copy: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    report = experiment_report(runs_copy, EXP, setup["root"])
    out = capsys.readouterr().out
    assert f"{EXP}: OOF over {K} folds, 12 images" in out and POOLED in out
    assert report["temperature_method"] == POOLED
    assert [r["temperature"] for r in report["temperature_table"]] == list(GRID)
    exp_dir = runs_copy / EXP
    rows = dict(line.split(",") for line in (exp_dir / "oof_report.csv").read_text().splitlines()[1:])
    assert float(rows["oof_miou"]) == pytest.approx(report["oof_miou"]) and "iou_wall" in rows
    for png in ("per_class_iou.png", "confusion.png"):
        assert (exp_dir / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = json.loads((exp_dir / "leaderboard_row.json").read_text())
    assert row["name"] == EXP and row["kind"] == "experiment" and row["oof_miou_nested"] == row["oof_miou"]
    assert {f"iou_{c}" for c in setup["root"].classes} <= set(row)
    # the row fits the leaderboard CSV of the submissions package
    from submissions.leaderboard import read_leaderboard, upsert_leaderboard

    board = upsert_leaderboard(row, runs_copy / "leaderboard.csv")
    assert read_leaderboard(board)["oof_miou"].iloc[0] == pytest.approx(report["oof_miou"])
