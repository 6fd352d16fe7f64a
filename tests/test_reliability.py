"""Nothing half-done, nothing dropped in silence: inputs checked before the first write, one writer per fold,
faults that name the user's file. Each case runs the entry point as a user types it and expects one
``error:`` line naming the file, flag or holder, a non-zero exit, no traceback, and nothing written or lost."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults.stores import write_store
from safetensors.torch import save_file

from foldwise.cli import one_line
from foldwise.io import write_text

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMOKE = ["--preset", "smoke", "--num_workers", "0"]


def run(*args: str, limit_bytes: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    def limit() -> None:  # a full disk, as `ulimit -f` gives it
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit if limit_bytes else None)


def one_error(proc: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not lines[-1].startswith("error: error:") and "\x1b[" not in lines[-1]
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return lines[-1]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stores(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("reliability") / "runs"
    write_store(runs, "exp_a", synthetic_root, seed=1)
    write_store(runs, "exp_b", synthetic_root, seed=2)
    return runs


def blend(runs: Path, out: Path, *extra: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    return run("ensemble/blend.py", "--runs-dir", str(runs), "--out-dir", str(out), "--name", "ab", "--workers", "1",
               "--pixels", "5000", *extra, limit_bytes=limit_bytes)


# ---------------------------------------------------------------------------------------- checked before written
@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["missing", "folder", "pickle", "keys that fit nothing"])
def test_a_bad_weights_path_is_refused_before_the_fold_folder_exists(synthetic_root, tmp_path, kind) -> None:
    weights = {"missing": tmp_path / "none.safetensors", "folder": tmp_path, "pickle": tmp_path / "evil.pt",
               "keys that fit nothing": tmp_path / "other.safetensors"}[kind]
    if kind == "pickle":
        torch.save({"model": {"w": torch.zeros(1)}, "extra": object()}, weights)
    if kind == "keys that fit nothing":
        save_file({"backbone.layer9.weight": torch.zeros(3)}, weights)
    out = tmp_path / "runs"
    proc = run("experiments/exp093_2.py", "--fold", "0", "--data-root", str(synthetic_root), "--out", str(out),
               *SMOKE, "--weights_path", str(weights))
    one_error(proc, "--weights_path", str(weights))
    assert not out.exists()  # nothing was written, so nothing blocks a later run with another recipe


@pytest.mark.e2e
def test_a_fold_folder_where_no_step_ran_does_not_block_another_recipe(synthetic_root, tmp_path) -> None:
    out = tmp_path / "runs"
    fold = out / "exp093_2" / "fold0"
    fold.mkdir(parents=True)
    write_text(fold / "config.yaml", "recipe: {optim: {lr: 0.5}}\n")  # a start that died before its first step
    proc = run("experiments/exp093_2.py", "--fold", "0", "--data-root", str(synthetic_root), "--out", str(out),
               *SMOKE, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((fold / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.e2e
def test_blend_outputs_and_leaderboard_are_checked_before_the_fit(stores, tmp_path) -> None:
    as_file = tmp_path / "a_file"
    as_file.write_text("mine")
    proc = blend(stores, as_file)
    one_error(proc, str(as_file))
    assert "blending" not in proc.stderr and as_file.read_text() == "mine"  # refused before the stores were read

    out = tmp_path / "sub"
    out.mkdir()
    board = out / "leaderboard.csv"
    board.write_text('name,kind,oof_miou\nexp_a,experiment,0.5\n"broken,blend\n')
    before = board.read_bytes()
    one_error(blend(stores, out), str(board))
    assert board.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["leaderboard.csv"]


@pytest.mark.e2e
def test_blend_refuses_a_broken_member_of_the_default_set_unless_skip_broken(stores, tmp_path) -> None:
    runs = Path(shutil.copytree(stores, tmp_path / "runs"))
    broken = runs / "exp_b" / "fold2" / "oof_ids.txt"
    broken.write_text("not_an_id\n")
    out = tmp_path / "sub"
    one_error(blend(runs, out), "exp_b", "fold 2", "--skip-broken")
    assert not out.exists()
    kept = blend(runs, out, "--skip-broken")
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert "LEFT OUT (--skip-broken): exp_b" in kept.stdout
    record = json.loads((out / "ab.json").read_text())
    assert record["members"] == ["exp_a"] and record["left_out"][0].startswith("exp_b")
    assert "left out exp_b" in (out / "leaderboard.csv").read_text()


# ---------------------------------------------------------------------------------- errors name the user's thing
@pytest.mark.e2e
def test_undecodable_text_records_name_their_file(synthetic_root, stores, tmp_path) -> None:
    root = Path(shutil.copytree(synthetic_root, tmp_path / "root"))
    (root / "folds.csv").write_bytes(b"id,fold\n\xff\xfe\x00\n")
    one_error(run("-m", "kfold.splits", "--data-root", str(root)), str(root / "folds.csv"), "not UTF-8")
    (root / "folds.csv").unlink()
    (root / "scenes.csv").write_bytes(b"id,scene\n\xe9t\xe9,1\n")
    one_error(run("-m", "kfold.splits", "--data-root", str(root)), str(root / "scenes.csv"), "not UTF-8")
    out = tmp_path / "sub"
    out.mkdir()
    (out / "leaderboard.csv").write_bytes(b"name,kind\n\xff,blend\n")
    one_error(blend(stores, out), str(out / "leaderboard.csv"), "not UTF-8")


@pytest.mark.e2e
def test_a_full_disk_names_the_file_and_keeps_what_was_written(synthetic_root, stores, tmp_path) -> None:
    out = tmp_path / "sub"
    assert blend(stores, out).returncode == 0
    before = files(out)
    line = one_error(blend(stores, out, limit_bytes=10_000), code=2)  # the submission is larger than that
    assert "could not be written" in line and str(out) in line and ".tmp" not in line
    assert files(out) == before  # the earlier blend's outputs are whole

    runs = tmp_path / "runs"
    line = one_error(run("experiments/exp093_2.py", "--fold", "1", "--data-root", str(synthetic_root), "--out",
                         str(runs), *SMOKE, limit_bytes=200_000), code=2)
    assert "could not be written" in line and str(runs / "exp093_2" / "fold1") in line
    assert not (runs / "exp093_2" / "fold1" / "manifest.json").exists()
    assert not list((runs / "exp093_2" / "fold1").glob(".*.tmp"))  # no half file left behind

    data = tmp_path / "data"
    line = one_error(run("-m", "kfold.data.synthetic", "--out", str(data), "--train", "4", "--test", "1",
                         "--size", "240x320", limit_bytes=30_000), code=2)  # an RGB image is larger than that
    assert f"{data}/train/images/" in line and "could not be written" in line and ".partial" not in line
    assert not data.exists() and not list(tmp_path.glob(".data*"))


def test_flags_are_named_as_typed(synthetic_root, stores, tmp_path, capsys) -> None:
    """The entry points' own main(), as the command line calls them (in this process: no training here)."""
    from ensemble.blend import main as blend_main
    from ensemble.predict import main as predict_main
    from kfold.data.synthetic import main as synthetic_main
    from kfold.splits import main as splits_main

    def refused(main, argv: list[str], *words: str) -> None:
        try:
            code = main(argv)
        except SystemExit as done:  # argparse's own refusals
            code = done.code
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        assert all(word in lines[0] for word in words), (words, lines[0])

    refused(blend_main, ["--runs-dir", str(stores), "--out-dir", str(tmp_path / "sub"), "--seed", "-1"], "--seed")
    refused(synthetic_main, ["--out", str(tmp_path / "d"), "--seed", "-1"], "--seed", "-1")
    refused(splits_main, ["--data-root", str(synthetic_root), "--seed", "-1"], "--seed", "-1")
    record = tmp_path / "subs"
    record.mkdir()
    (record / "rgbd.json").write_text(json.dumps({"name": "rgbd", "members": ["exp_a"], "weights": [1.0],
                                                  "temperatures": [1.0], "classes": []}))
    common = ["--blend", "rgbd", "--runs-dir", str(stores), "--submissions", str(record),
              "--images", str(synthetic_root / "test" / "images"), "--out", str(tmp_path / "masks")]
    refused(predict_main, [*common, "--tta-scales", "-1"], "--tta-scales", "-1")
    refused(predict_main, [*common, "--depths", str(tmp_path / "no_depths")], "--depths", str(tmp_path / "no_depths"))
    assert not (tmp_path / "masks").exists() and not (tmp_path / "d").exists() and not (tmp_path / "sub").exists()


# ------------------------------------------------------------------------------------- records read strictly
def test_status_shows_unreadable_records_as_corrupt_and_unknown_names_exit_2(tmp_path) -> None:
    runs = tmp_path / "runs"
    for k, (name, text) in enumerate([("job.json", "{bad"), ("manifest.json", "[1,"), ("config.yaml", "- a\n")]):
        (runs / "exp" / f"fold{k}").mkdir(parents=True)
        (runs / "exp" / f"fold{k}" / name).write_text(text)
    proc = run("-m", "kfold.status", "--out", str(runs))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {int(line.split()[1]): line for line in proc.stdout.splitlines()[1:-1]}
    for k, name in enumerate(["job.json", "manifest.json", "config.yaml"]):
        assert rows[k].split()[2] == "corrupt" and f" {runs / 'exp' / f'fold{k}' / name}: " in rows[k], rows[k]
    one_error(run("-m", "kfold.status", "--out", str(runs), "exp_typo"), "exp_typo", "exp")


def test_key_maps_that_collide_and_class_maps_with_other_than_names_are_refused(tmp_path) -> None:
    source = tmp_path / "foreign.safetensors"
    save_file({"a.layer1.weight": torch.zeros(2), "b.layer1.weight": torch.ones(2)}, source)
    out = tmp_path / "init.safetensors"
    one_error(run("-m", "kfold.weights", "convert", str(source), "--map", r"^[ab]\.=encoder.", "--out", str(out)),
              "a.layer1.weight", "b.layer1.weight", "encoder.layer1.weight")
    assert not out.exists()

    from foldwise.classmap import class_map_from_groups

    for groups, words in (({1: ["bed"]}, "new class name 1"), ({"rest": ["bed", 3]}, "lists 3")):
        with pytest.raises(ValueError, match=words):
            class_map_from_groups(groups, ("bed", "wall"), "map.yaml")


# ------------------------------------------------------------------------------------------ one writer per fold
@pytest.mark.e2e
def test_two_launches_of_one_fold_one_waits_or_is_refused_and_a_dead_holder_is_taken_over(synthetic_root,
                                                                                          tmp_path) -> None:
    out = tmp_path / "runs"
    fold = out / "exp093_2" / "fold0"
    args = ["experiments/exp093_2.py", "--fold", "0", "--data-root", str(synthetic_root), "--out", str(out), *SMOKE,
            "--opts", "schedule.epochs", "20"]  # long enough for the two other launches to meet it
    first = subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (fold / "last.pt").is_file():
            assert time.monotonic() < deadline and first.poll() is None, "the first launch did not start"
            time.sleep(0.05)
        second = run(*args, "--opts", "optim.lr", "0.002")
        line = one_error(second, str(fold), f"pid {first.pid}", "--wait")
        assert "being written by" in line
        waiting = subprocess.Popen([sys.executable, *args, "--wait"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        out_wait, err_wait = waiting.communicate(timeout=300)  # it waits for the first, then finds the fold done
        assert waiting.returncode == 0, err_wait[-2000:]
        assert "waiting for pid" in out_wait and "complete, skipped" in out_wait, out_wait[-2000:]
        first.communicate(timeout=300)
    finally:
        if first.poll() is None:  # a failed check above: do not leave it running
            first.kill()
            first.wait()
    assert first.returncode == 0
    manifest = (fold / "manifest.json").read_bytes()

    # A holder killed with SIGKILL leaves its record but not its lock: the next run takes over, saying so.
    killed = subprocess.Popen([sys.executable, *args[:-2], "schedule.epochs", "8", "--retrain"], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (fold / "last.pt").is_file() or json.loads((fold / ".fold.lock").read_text() or "{}").get(
            "pid") != killed.pid:
        assert time.monotonic() < deadline and killed.poll() is None
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    again = run(*args[:-2], "schedule.epochs", "8", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"took over the lock of pid {killed.pid}" in again.stdout
    assert (fold / "manifest.json").read_bytes() != manifest


# ----------------------------------------------------------------------------------------------------- units
def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path) -> None:
    target = tmp_path / "record.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".record.json.{dead.pid}.x1y2.tmp"
    live = tmp_path / f".record.json.{os.getpid()}.z3w4.tmp"  # a writer still at work: left alone
    stale.write_text("half")
    live.write_text("half")
    write_text(target, "{}")
    assert target.read_text() == "{}" and not stale.exists() and live.exists()


def test_error_lines_carry_no_escape_codes_and_no_doubled_prefix() -> None:
    assert one_line(ValueError("error: \x1b[31mbad\x1b[0m value\n  more")) == "bad value more"
