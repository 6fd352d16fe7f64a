"""Fault injection: SIGKILL at chosen points of a fold and of a blend, NaN / inf losses, pickled checkpoints.

The promise under test: whatever is killed, nothing already written is lost or mistaken for complete (the
manifest decides), and ``--resume`` or a re-run ends where an uninterrupted run ends. Kill points are hit
deterministically by ``tests/faults/driver.py``, which runs the real script with one write paused.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from faults.stores import write_store
from safetensors import safe_open
from safetensors.torch import load_file

from ensemble.blend import main as blend_main
from kfold.checkpoint import load_checkpoint
from kfold.cli import main as cli_main
from kfold.losses import SegDepthLoss
from kfold.models import read_state_dict
from kfold.store.format import StoreError
from kfold.store.format import is_complete as fold_complete
from kfold.store.read import open_experiment
from submissions.validate import read_submission

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "faults" / "driver.py"
EXP = "exp093_2"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The smoke preset with a 2M-parameter encoder and a 64-wide FPN (its GroupNorms need >= 32 channels in the
# half-width segmentation branch): last.pt is ~7 MB instead of ~200 MB, the kill points are the same.
SMALL = ["--preset", "smoke", "--num_workers", "0", "--opts", "oof.batch_size", "4",
         "model.encoder", "tu-mobilenetv3_small_050", "model.decoder_channels", "64"]
STEPS_PER_EPOCH = 3  # smoke: train.max_steps_per_epoch
TIMEOUT = 240


def fold_args(root: Path, out: Path) -> list[str]:
    return [f"experiments/{EXP}.py", "--fold", "0", "--data-root", str(root), "--out", str(out), *SMALL]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: a chatty child can never block on a full pipe
        return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread, as the subprocesses do (OMP_NUM_THREADS=1).

    The arithmetic is then that of the subprocesses, so results compare exactly, and a busy 2-core machine
    is not oversubscribed.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def finish(args: list[str]) -> None:
    """Run the experiment script's ``main`` here: it spares the ~8 s import of a fresh interpreter."""
    assert cli_main(EXP, {}, args[1:]) == 0


def same_weights(a: Path, b: Path) -> bool:
    """Equal tensors and metadata (the bytes may differ: safetensors writes metadata in hash-map order)."""
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        names = sorted(fa.keys())
        if fa.metadata() != fb.metadata() or names != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in names)


def kill_at(cmd: list[str], pause: str, tmp: Path) -> None:
    """Run ``cmd`` under the driver, SIGKILL it once it sits at ``pause`` (see tests/faults/driver.py)."""
    marker, log = tmp / f"paused-{pause.replace(':', '')}", tmp / f"killed-{pause.replace(':', '')}.log"
    marker.unlink(missing_ok=True)
    proc = start([str(DRIVER), "--marker", str(marker), "--pause", pause, *cmd], log)
    deadline = time.time() + TIMEOUT
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive and marker.exists(), f"never reached {pause}:\n{log.read_text()[-3000:]}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporaries(folder: Path, name: str) -> list[Path]:
    """Hidden ``.<name>.*.tmp`` files that foldwise.io / submissions.common leave when killed mid-write."""
    return sorted(folder.glob(f".{name}.*.tmp"))


def error_line(err: str) -> str:
    """The one ``error: ...`` line a command ends with (progress logs may come before it; no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


@pytest.fixture(scope="module")
def reference(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """An uninterrupted run of the fold, started in the background; call the result to wait for it."""
    out = tmp_path_factory.mktemp("reference")
    proc = start(fold_args(synthetic_root, out), out / "run.log")

    def wait() -> Path:
        assert proc.wait(timeout=TIMEOUT) == 0, (out / "run.log").read_text()[-3000:]
        return out / EXP / "fold0"

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_same_fold(run: Path, ref: Path) -> None:
    """The fold's weights, per-epoch metrics and stores equal those of the uninterrupted run."""
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    a, b = load_file(run / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    ma, mb = pd.read_csv(run / "metrics.csv"), pd.read_csv(ref / "metrics.csv")
    assert list(ma["epoch"]) == list(mb["epoch"]) == [1, 2]
    np.testing.assert_allclose(ma["val_miou"], mb["val_miou"], atol=1e-9)
    for name in ("oof", "test"):
        assert (run / f"{name}_ids.txt").read_text() == (ref / f"{name}_ids.txt").read_text()
        np.testing.assert_allclose(np.load(run / f"{name}.npy").astype(np.float32),
                                   np.load(ref / f"{name}.npy").astype(np.float32), atol=1e-3)


def test_fold_killed_mid_epoch_in_checkpoint_write_and_in_oof_write_resumes_to_uninterrupted_result(
    synthetic_root: Path, tmp_path: Path, reference: Callable[[], Path]
) -> None:
    out = tmp_path / "runs"
    run, args = out / EXP / "fold0", fold_args(synthetic_root, out)
    last = run / "last.pt"

    # 1. Mid-epoch: SIGKILL at epoch 2, step 2. Epoch 1's last.pt is whole; nothing says the fold is done.
    kill_at(args, f"loss:{STEPS_PER_EPOCH + 2}", tmp_path)
    assert load_checkpoint(last, torch.device("cpu"))["epoch"] == 1
    assert not (run / "model.safetensors").exists() and not fold_complete(run)
    epoch1 = sha(last)

    # 2. --resume, SIGKILL while torch.save has written half of epoch 2's checkpoint.
    kill_at([*args, "--resume"], "save:1", tmp_path)
    assert sha(last) == epoch1, "the previous last.pt changed"
    half = temporaries(run, "last.pt")
    assert len(half) == 1 and 0 < half[0].stat().st_size < last.stat().st_size
    with pytest.raises(ValueError, match="not a loadable"):  # it really is half a checkpoint ...
        load_checkpoint(half[0], torch.device("cpu"))
    assert not (run / "model.safetensors").exists() and not fold_complete(run)  # ... and nobody took it

    # 3. --resume finishes from epoch 1's checkpoint: the same fold as an uninterrupted run.
    finish([*args, "--resume"])
    ref = reference()
    assert_same_fold(run, ref)
    kept = {name: sha(run / name) for name in ("oof.npy", "test.npy", "oof_ids.txt", "test_ids.txt", "last.pt")}
    weights = Path(shutil.copy(run / "model.safetensors", tmp_path / "weights-after-resume.safetensors"))

    # 4. --predict-only, SIGKILL in the OOF write (second TTA batch): the previous stores are intact, the
    #    manifest is gone first, so the fold is not taken as complete while its files are being replaced.
    kill_at([*args, "--predict-only"], "tta:2", tmp_path)
    assert {name: sha(run / name) for name in kept} == kept
    assert sha(run / "model.safetensors") == sha(weights)
    assert temporaries(run, "oof.npy"), "the kill did not land inside the OOF write"
    assert not (run / "manifest.json").exists() and not fold_complete(run)
    with pytest.raises(StoreError, match="fold 0: .*manifest.json missing"):
        open_experiment(out, EXP)

    # 5. --resume again: complete, byte-identical stores, still the uninterrupted result.
    finish([*args, "--resume"])
    assert_same_fold(run, ref)
    assert {name: sha(run / name) for name in ("oof.npy", "test.npy")} == {n: kept[n] for n in ("oof.npy", "test.npy")}
    assert same_weights(run / "model.safetensors", weights)
    with pytest.raises(StoreError, match="fold 1: .*manifest.json missing"):  # fold 0 counts again
        open_experiment(out, EXP)


def _spawned_workers(tag: str) -> set[int]:
    """pids of multiprocessing spawn workers whose environment carries ``FOLDWISE_TEST_RUN=<tag>``."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (b"spawn_main" in (proc / "cmdline").read_bytes()
                    and f"FOLDWISE_TEST_RUN={tag}".encode() in (proc / "environ").read_bytes().split(b"\0")):
                pids.add(int(proc.name))
        except OSError:
            pass
    return pids


def test_blend_killed_during_submission_write_keeps_previous_submission(synthetic_root: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    runs, sub = tmp_path / "runs", tmp_path / "sub"
    write_store(runs, "exp_a", synthetic_root, seed=1)
    write_store(runs, "exp_b", synthetic_root, seed=2)
    args = ["--runs-dir", str(runs), "--out-dir", str(sub), "--name", "ab", "--method", "uniform",
            "--no-temperature", "--pixels", "5000"]
    assert blend_main(args) == 0
    csv_path = sub / "ab.csv"
    before = {p.name: sha(p) for p in (csv_path, sub / "ab.json", sub / "leaderboard.csv")}

    monkeypatch.setitem(ENV, "FOLDWISE_TEST_RUN", str(tmp_path))  # marks the killed blend's pool workers
    kill_at(["ensemble/blend.py", *args], "csv:1", tmp_path)
    deadline = time.monotonic() + 15  # they notice their parent is gone (they poll each second) and exit
    while _spawned_workers(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _spawned_workers(str(tmp_path)), "the killed blend left its worker processes running"
    assert {p: sha(sub / p) for p in before} == before, "a previous output changed"
    half = temporaries(sub, "ab.csv")
    assert len(half) == 1, "the kill did not land inside the submission write"
    assert 1 < len(half[0].read_text().splitlines()) < len(csv_path.read_text().splitlines())
    assert len(read_submission(csv_path)) == 8 * 13  # the CSV under the real name is the whole one

    assert blend_main(args) == 0  # a re-run ends where the uninterrupted one did
    assert sha(csv_path) == before["ab.csv"]


@pytest.mark.parametrize(("value", "epoch", "step"), [("nan", 2, 1), ("inf", 1, 2)])
def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_last_good_checkpoint(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    value: str, epoch: int, step: int
) -> None:
    real, calls = SegDepthLoss.forward, [0]

    def forward(self, *args, **kwargs):
        loss, parts = real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == (epoch - 1) * STEPS_PER_EPOCH + step:
            loss = loss * float(value)
        return loss, parts

    monkeypatch.setattr(SegDepthLoss, "forward", forward)
    args = ["--fold", "0", "--data-root", str(synthetic_root), "--out", str(tmp_path), *SMALL]
    run = tmp_path / EXP / "fold0"
    assert cli_main(EXP, {}, args) == 2
    err = error_line(capsys.readouterr().err)
    assert f"loss is {value} at epoch {epoch}, step {step}" in err
    if epoch > 1:  # the last good checkpoint survives, whole and finite
        state = load_checkpoint(run / "last.pt", torch.device("cpu"))
        assert state["epoch"] == epoch - 1
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    else:
        assert not (run / "last.pt").exists()
    assert not (run / "model.safetensors").exists() and not fold_complete(run)

    monkeypatch.undo()  # the fault is gone: --resume finishes the fold
    assert cli_main(EXP, {}, [*args, "--resume"]) == 0
    assert fold_complete(run)
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2]
    with safe_open(run / "model.safetensors", "pt") as f:  # prediction weights travel as safetensors
        assert f.metadata()["epoch"] == "2"


class Payload:
    """Unpickling this runs ``Path.touch(marker)``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "ema": {"w": torch.zeros(2)}, "evil": Payload(marker)}, path)
    return path, marker


def test_a_checkpoint_carrying_a_pickled_object_is_refused(evil_checkpoint: tuple[Path, Path]) -> None:
    path, marker = evil_checkpoint
    for load in (lambda: load_checkpoint(path, torch.device("cpu")), lambda: read_state_dict(path)):
        with pytest.raises(ValueError) as info:
            load()
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


@pytest.mark.parametrize("how", ["--weights_path", "--resume"])
def test_pickled_checkpoint_through_the_command_line_is_one_line_and_never_run(
    synthetic_root: Path, tmp_path: Path, evil_checkpoint: tuple[Path, Path], capsys: pytest.CaptureFixture,
    how: str
) -> None:
    path, marker = evil_checkpoint
    out = tmp_path / "runs"
    args = ["--fold", "0", "--data-root", str(synthetic_root), "--out", str(out), *SMALL]
    if how == "--resume":
        (out / EXP / "fold0").mkdir(parents=True)
        path = Path(path.replace(out / EXP / "fold0" / "last.pt"))
        args.append("--resume")
    else:
        args += ["--weights_path", str(path)]
    assert cli_main(EXP, {}, args) == 2
    err = error_line(capsys.readouterr().err)
    assert str(path) in err and "weights-only" in err
    assert not marker.exists()


def _project_files() -> list[Path]:
    files = []
    for folder in ("kfold", "ensemble", "tta", "submissions", "experiments", "bench", "tests"):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def test_every_torch_load_is_weights_only_and_nothing_is_evaluated() -> None:
    """Static audit: torch.load(..., weights_only=True); no eval / exec / pickle / unsafe YAML / pickled npy."""
    problems, loads = [], 0
    for path in _project_files():
        if path == Path(__file__).resolve():
            continue  # this file loads the payload checkpoint unsafely on purpose, to prove it is real
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            func, kw = node.func, {k.arg: k.value for k in node.keywords}
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            if (owner, name) == ("torch", "load"):
                loads += 1
                flag = kw.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif isinstance(func, ast.Name) and name in ("eval", "exec"):
                problems.append(f"{where}: {name}()")
            elif owner == "pickle" and name in ("load", "loads", "Unpickler"):
                problems.append(f"{where}: pickle.{name}")
            elif owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
                problems.append(f"{where}: yaml.{name} (use yaml.safe_load)")
            elif owner == "np" and name == "load" and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value:
                problems.append(f"{where}: np.load(allow_pickle=True)")
    assert loads >= 2  # kfold/checkpoint.py and kfold/models.py at least: the audit sees them
    assert not problems, problems
