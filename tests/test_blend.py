"""ensemble/blend.py on fake complete experiment stores written in the kfold.store manifest format.

Model A is right and confident on classes 0-6 and confidently wrong on 7-12; model B is right but soft on
7-12 and softly wrong on 0-6. Uniform weights follow A everywhere; a blend leaning on B gets every class.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from faults.stores import Probs, write_store

from ensemble.blend import main
from foldwise.io import write_json
from kfold.data.layout import open_root, read_label
from kfold.data.synthetic import generate
from kfold.metrics import confusion_matrix, mean_iou
from kfold.splits import ensure_folds, read_folds
from submissions.leaderboard import read_leaderboard
from submissions.score import score_submission
from submissions.validate import read_submission, validate_submission
from tta import apply_temperature

REPO = Path(__file__).resolve().parents[1]
C = 13
GOOD_A = set(range(7))


def blend_probs(good: set[int], peak_good: float, peak_bad: float) -> Probs:
    """Probabilities peaked on the label (good classes) or on a wrong class fixed per image."""

    def probs(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
        n = labels.shape[0]
        lab = np.where(labels == 255, 11, labels).astype(np.int64)
        offset = rng.integers(1, C, size=(n, C))  # the wrong class of each (image, true class) region
        wrong = (lab + np.take_along_axis(offset, lab.reshape(n, -1), 1).reshape(lab.shape)) % C
        is_good = np.isin(lab, list(good))
        target = np.where(is_good, lab, wrong)
        peak = np.where(is_good, peak_good, peak_bad)[:, None]
        onehot = np.moveaxis(np.eye(C)[target], -1, 1)
        p = onehot * peak + (1 - onehot) * (1 - peak) / (C - 1)
        p = p * np.exp(0.3 * rng.standard_normal(p.shape))
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float16)

    return probs


def write_fake_experiment(runs: Path, name: str, root_path: Path, good: set[int], peaks: tuple[float, float],
                          seed: int, sha: str | None = None) -> None:
    write_store(runs, name, root_path, seed=seed, probs=blend_probs(good, *peaks), folds_sha256_override=sha)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("blend")
    root = generate(base / "root", n_train=20, n_test=4, size=(32, 48), seed=0)
    ensure_folds(open_root(root), k=3, seed=42)  # 3 folds: 3 nested fits keep the file fast
    runs = base / "runs"
    write_fake_experiment(runs, "exp_a", root, GOOD_A, (0.9, 0.9), seed=1)
    write_fake_experiment(runs, "exp_b", root, set(range(C)) - GOOD_A, (0.45, 0.15), seed=2)
    out = base / "sub"
    rc = main(["--runs-dir", str(runs), "--runs", "exp_a", "exp_b", "--out-dir", str(out), "--name", "ab",
               "--order", "F", "--seed", "0"])
    assert rc == 0
    return {"root": root, "runs": runs, "out": out, "record": json.loads((out / "ab.json").read_text())}


def _split_probs(runs: Path, name: str, split: str) -> dict[str, np.ndarray]:
    """id -> float32 (C, h, w): OOF rows by id, or test rows averaged over the folds."""
    out: dict[str, list[np.ndarray]] = {}
    for d in sorted((runs / name).glob("fold*")):
        ids = (d / f"{split}_ids.txt").read_text().split()
        for i, row in zip(ids, np.load(d / f"{split}.npy").astype(np.float32)):
            out.setdefault(i, []).append(row)
    return {i: np.mean(rows, axis=0) for i, rows in out.items()}


def _direct_cm(runs: Path, root: Path, split: str, weights, temps, names=("exp_a", "exp_b"), ids=None) -> np.ndarray:
    """Confusion of a blend computed image by image, independently of ensemble/stores.py."""
    r = open_root(root, verify=False)
    probs = [_split_probs(runs, n, split) for n in names]
    cm = np.zeros((C, C), dtype=np.int64)
    for i in sorted(probs[0]) if ids is None else ids:
        # a weight is a number or one per class (then broadcast over the class axis of (1, C, h, w))
        mix = sum(torch.as_tensor(np.asarray(w, dtype=np.float32)).reshape(1, -1, 1, 1)
                  * apply_temperature(torch.from_numpy(p[i])[None], t) for p, w, t in zip(probs, weights, temps))
        pred = F.interpolate(mix, size=r.image_size, mode="bilinear", align_corners=False).argmax(1)[0].numpy()
        cm += confusion_matrix(read_label(r.label_path("train" if split == "oof" else "test", i), C), pred, C)
    return cm


@pytest.mark.e2e
def test_blend_beats_uniform_and_best_single_on_full_res_oof(setup: dict) -> None:
    rec, runs, root = setup["record"], setup["runs"], setup["root"]
    blend = mean_iou(_direct_cm(runs, root, "oof", rec["weights"], rec["temperatures"]))
    assert rec["oof"]["miou"] == pytest.approx(blend, abs=1e-9)  # the streamed score is the direct one
    uniform = mean_iou(_direct_cm(runs, root, "oof", [0.5, 0.5], [1, 1]))
    singles = [mean_iou(_direct_cm(runs, root, "oof", w, [1, 1])) for w in ([1, 0], [0, 1])]
    assert rec["member_scores"]["exp_a"]["miou"] == pytest.approx(singles[0], abs=1e-9)
    assert blend > uniform + 0.1 and blend > max(singles) + 0.1, (blend, uniform, singles)
    assert rec["chosen"] == "optimiser" and rec["moved"] and rec["weights"][1] > 0.5


def test_nested_is_held_out_full_res_and_not_above_in_sample(setup: dict) -> None:
    rec, runs, root = setup["record"], setup["runs"], setup["root"]
    assert [f["fold"] for f in rec["nested_folds"]] == [0, 1, 2]
    folds = read_folds(open_root(root, verify=False))
    pooled = sum(_direct_cm(runs, root, "oof", f["weights"], f["temperatures"],
                            ids=sorted(i for i, g in folds.items() if g == f["fold"])) for f in rec["nested_folds"])
    assert rec["nested"]["miou"] == pytest.approx(mean_iou(pooled), abs=1e-9)
    assert 0 < rec["nested"]["miou"] <= rec["oof"]["miou"] + 0.02


def test_submission_validates_and_local_score_is_direct(setup: dict) -> None:
    rec, root, out = setup["record"], setup["root"], setup["out"]
    r = open_root(root, verify=False)
    df = read_submission(out / "ab.csv")
    validate_submission(df, dict.fromkeys(r.test_ids, r.image_size), C, order="F")
    scored = score_submission(out / "ab.csv", root / "test_labels", C, order="F")
    direct = mean_iou(_direct_cm(setup["runs"], root, "test", rec["weights"], rec["temperatures"]))
    assert scored["miou"] == pytest.approx(direct, abs=1e-9) == rec["test"]["miou"]
    for name, weights in (("exp_a", [1, 0]), ("exp_b", [0, 1])):  # each member alone, on the same test images
        alone = mean_iou(_direct_cm(setup["runs"], root, "test", weights, [1, 1]))
        assert rec["test"]["members"][name]["miou"] == pytest.approx(alone, abs=1e-9)
    assert (out / "plots" / "ab_weights.png").stat().st_size > 0 and (out / "plots" / "ab_per_class.png").is_file()


def test_leaderboard_has_blend_and_member_rows(setup: dict) -> None:
    board = read_leaderboard(setup["out"] / "leaderboard.csv").set_index("name")
    assert set(board.index) == {"ab", "exp_a", "exp_b"}
    assert board.loc["ab", "kind"] == "blend" and board.loc["exp_a", "kind"] == "experiment"
    assert board.loc["ab", "oof_miou"] == pytest.approx(setup["record"]["oof"]["miou"])
    assert board.loc["exp_b", "oof_miou"] == pytest.approx(setup["record"]["member_scores"]["exp_b"]["miou"])


@pytest.mark.e2e
def test_dry_run_writes_nothing_and_single_member_blends(setup: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub"
    rc = main(["--runs-dir", str(setup["runs"]), "--runs", "exp_b", "--out-dir", str(out), "--dry-run",
               "--pixels", "2000"])
    assert rc == 0 and not out.exists()
    table = capsys.readouterr().out
    assert "blend (slsqp)" in table and "exp_b=1.000" in table and "dry run" in table


@pytest.mark.e2e
def test_missing_fold_manifest_is_one_line_exit_2(setup: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    (runs / "exp_b" / "fold2" / "manifest.json").unlink()
    proc = subprocess.run([sys.executable, "ensemble/blend.py", "--runs-dir", str(runs), "--runs", "exp_a",
                           "exp_b", "--out-dir", str(tmp_path / "sub")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: exp_b fold 2:") and "manifest.json" in lines[0]
    assert not (tmp_path / "sub").exists()


def test_different_folds_are_refused(setup: dict, tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"] / "exp_a", runs / "exp_a")
    write_fake_experiment(runs, "exp_c", setup["root"], GOOD_A, (0.9, 0.9), seed=3, sha="0" * 64)
    assert main(["--runs-dir", str(runs), "--out-dir", str(tmp_path / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "different folds.csv" in err and "\n" not in err


@pytest.mark.e2e
def test_sample_submission_order_and_hillclimb(setup: dict, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(setup["root"], root)
    ids = sorted(open_root(root, verify=False).test_ids, reverse=True)
    rows = [f"{i},{c}," for i in ids for c in reversed(range(C))]
    (root / "sample_submission.csv").write_text("ImageId,ClassId,EncodedPixels\n" + "\n".join(rows) + "\n")
    out = tmp_path / "sub"
    rc = main(["--runs-dir", str(setup["runs"]), "--out-dir", str(out), "--data-root", str(root), "--method",
               "hillclimb", "--no-temperature", "--name", "hc"])
    assert rc == 0
    df = read_submission(out / "hc.csv")
    assert list(zip(df["ImageId"], df["ClassId"].astype(int))) == [(i, c) for i in ids for c in reversed(range(C))]
    rec = json.loads((out / "hc.json").read_text())
    assert rec["temperatures"] == [1.0, 1.0] and rec["data_root"] == str(root)
    assert rec["test"]["miou"] == pytest.approx(score_submission(out / "hc.csv", root / "test_labels", C)["miou"])


@pytest.mark.e2e
def test_default_skips_incomplete_and_uses_leaderboard_row(setup: dict, tmp_path: Path, capsys) -> None:
    runs, out = tmp_path / "runs", tmp_path / "sub"
    shutil.copytree(setup["runs"], runs)
    (runs / "exp_b" / "fold1" / "manifest.json").unlink()
    row = {"name": "exp_a", "kind": "experiment", "members": "exp_a", "weights": "1", "temperatures": "1",
           "oof_miou": 0.123, "oof_miou_nested": 0.123, "pixel_acc": 0.5, "iou_bed": None, "submission": ""}
    write_json(runs / "exp_a" / "leaderboard_row.json", row)
    assert main(["--runs-dir", str(runs), "--out-dir", str(out), "--pixels", "2000"]) == 0
    captured = capsys.readouterr()
    assert "skipped exp_b fold 1:" in captured.err and "exp_b" not in captured.out
    board = read_leaderboard(out / "leaderboard.csv").set_index("name")
    assert set(board.index) == {"blend_slsqp_exp_a", "exp_a"} and board.loc["exp_a", "oof_miou"] == 0.123
    assert (out / "blend_slsqp_exp_a.csv").is_file()


@pytest.mark.e2e
def test_per_class_blend_writes_a_class_by_member_record(setup: dict, tmp_path: Path, capsys) -> None:
    """The record, table, plot and leaderboard of a per-class blend; its scores are the direct ones."""
    runs, root, out = setup["runs"], setup["root"], tmp_path / "sub"
    assert main(["--runs-dir", str(runs), "--runs", "exp_a", "exp_b", "--out-dir", str(out), "--per-class"]) == 0
    table = capsys.readouterr().out
    name = "blend_slsqp-per-class_exp_a+exp_b"
    rec = json.loads((out / f"{name}.json").read_text())
    assert rec["per_class"] and "blend (slsqp-per-class)" in table and "weights per class:" in table
    alone = {line.split()[0]: float(line.split()[2]) for line in table.splitlines() if " alone " in line}
    assert alone == pytest.approx({n: s["miou"] for n, s in rec["test"]["members"].items()}, abs=1e-4)
    assert set(rec["candidates_sample"]) == {"uniform", "best_single:0", "global", "optimiser"}
    weights = np.asarray(rec["weights"])
    assert rec["chosen"] == "optimiser" and weights.shape == (2, C) and np.allclose(weights.sum(axis=0), 1)
    # each class trusts the model that gets it: above the global blend, in-sample and nested, at full resolution
    assert rec["oof"]["miou"] > setup["record"]["oof"]["miou"] + 0.03
    assert rec["nested"]["miou"] > setup["record"]["nested"]["miou"]
    # the global blend it started from is scored beside it (the same fit as the plain blend's)
    assert rec["global"]["oof"]["miou"] == pytest.approx(setup["record"]["oof"]["miou"], abs=1e-9)
    assert rec["global"]["nested"]["miou"] == pytest.approx(setup["record"]["nested"]["miou"], abs=1e-9)
    assert "blend (global)" in table and "global (nested)" in table and setup["record"]["global"] is None
    assert rec["oof"]["miou"] == pytest.approx(mean_iou(_direct_cm(runs, root, "oof", weights,
                                                                   rec["temperatures"])), abs=1e-9)
    assert rec["test"]["miou"] == pytest.approx(mean_iou(_direct_cm(runs, root, "test", weights,
                                                                    rec["temperatures"])), abs=1e-9)
    assert (out / "plots" / f"{name}_weights.png").stat().st_size > 0
    board = read_leaderboard(out / "leaderboard.csv").set_index("name")
    assert np.allclose(json.loads(board.loc[name, "weights"]), np.round(weights, 4))
    with pytest.raises(SystemExit):
        main(["--runs-dir", str(runs), "--method", "hillclimb", "--per-class"])
    assert "--per-class needs --method slsqp" in capsys.readouterr().err


@pytest.mark.e2e
def test_worker_processes_give_the_in_process_blend(setup: dict, tmp_path: Path) -> None:
    """The passes split over a pool (the default on 2+ CPUs) and run in this process give the same files."""
    runs, out = setup["runs"], {n: tmp_path / n for n in ("one", "two")}
    for name, workers in (("one", "1"), ("two", "2")):
        assert main(["--runs-dir", str(runs), "--runs", "exp_a", "exp_b", "--out-dir", str(out[name]), "--name",
                     "ab", "--order", "F", "--seed", "0", "--per-class", "--workers", workers]) == 0
    assert (out["one"] / "ab.csv").read_bytes() == (out["two"] / "ab.csv").read_bytes()
    one, two = (json.loads((out[n] / "ab.json").read_text()) for n in ("one", "two"))
    for key in ("weights", "temperatures", "oof", "nested", "member_scores", "global"):
        assert one[key] == two[key], key
    assert {**one["test"], "source": ""} == {**two["test"], "source": ""}


def test_members_scores_are_kept_beside_their_stores_and_reused_while_valid(setup: dict, tmp_path: Path) -> None:
    """A blend keeps each member's own OOF / test confusion in runs/<exp>/store_scores.json; the next blend
    takes it from there (a planted matrix shows through), until a fold's oof.npy is written again."""
    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    for p in runs.glob("*/store_scores.json"):
        p.unlink()
    args = ["--runs-dir", str(runs), "--runs", "exp_a", "exp_b", "--seed", "0", "--workers", "1"]
    assert main([*args, "--out-dir", str(tmp_path / "one")]) == 0
    record = json.loads((runs / "exp_a" / "store_scores.json").read_text())
    first = json.loads(next((tmp_path / "one").glob("blend_*.json")).read_text())
    truth = first["member_scores"]["exp_a"]["miou"]
    assert mean_iou(np.asarray(record["oof"]["confusion"])) == pytest.approx(truth, abs=1e-12)
    assert set(record) == {"oof", "test"}
    planted = np.eye(C, dtype=np.int64) * 7  # a perfect score no model has
    record["oof"]["confusion"] = planted.tolist()
    write_json(runs / "exp_a" / "store_scores.json", record)
    assert main([*args, "--out-dir", str(tmp_path / "two")]) == 0
    second = json.loads(next((tmp_path / "two").glob("blend_*.json")).read_text())
    assert second["member_scores"]["exp_a"]["miou"] == 1.0  # reused, not recomputed
    oof = runs / "exp_a" / "fold1" / "oof.npy"
    oof.write_bytes(oof.read_bytes())  # the same values, written again: another mtime
    assert main([*args, "--out-dir", str(tmp_path / "three")]) == 0
    third = json.loads(next((tmp_path / "three").glob("blend_*.json")).read_text())
    assert third["member_scores"]["exp_a"]["miou"] == pytest.approx(truth, abs=1e-12)


def _bytes_read() -> int:
    """Bytes this process has read through read() calls (page-cache hits included), from /proc/self/io."""
    line = next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:"))
    return int(line.split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads /proc/self/io (Linux)")
def test_warm_page_cache_reads_every_file_in_the_background_then_stops(tmp_path: Path) -> None:
    import threading
    import time

    from ensemble.passes import warm_page_cache

    files = []
    for i, size in enumerate((3 << 20, 1 << 20, 20 << 20)):  # one file outlasts the others: round-robin
        files.append(tmp_path / f"store{i}.npy")
        files[-1].write_bytes(np.random.default_rng(i).bytes(size))
    before = _bytes_read()
    with warm_page_cache(files) as size:
        assert size == 24 << 20
        deadline = time.monotonic() + 30
        while _bytes_read() - before < size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _bytes_read() - before >= size  # every byte of every file went through a read
    assert not any(t.name == "warm-page-cache" for t in threading.enumerate())  # stopped with the block
    with warm_page_cache(files, keep_free=1 << 60) as size:  # would not fit beside the memory kept free
        assert size == 0
