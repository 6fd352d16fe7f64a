"""The ``foldwise`` command as a user types it: it lists its subcommands, each subcommand is the module it names
(same ``--help``, same errors), and a mistyped command or experiment is one ``error:`` line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from foldwise.commands import COMMANDS, GROUPS

REPO = Path(__file__).resolve().parents[1]
FOLDWISE = [sys.executable, "-m", "foldwise"]  # what the console script `foldwise` runs (foldwise.commands:main)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*FOLDWISE, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_help_lists_every_subcommand_on_one_line_each() -> None:
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    groups = [f"{g} {s}" for g, subs in GROUPS.items() for s in subs]
    assert listed == ["train", *COMMANDS, *(g.split()[0] for g in groups)]
    for group in groups:
        assert f"  {group} " in proc.stdout
    probe = subprocess.run([sys.executable, "-c", "import contextlib, io, sys; from foldwise.commands import main\n"
                            "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
                            "print(sorted(m for m in ('torch', 'kfold', 'ensemble') if m in sys.modules))"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # the listing imports nothing it dispatches to


@pytest.mark.parametrize("command", [["status"], ["blend"], ["score"], ["data", "synthetic"], ["weights", "convert"],
                                     ["train", "exp093_2"]])
def test_subcommand_help_is_the_modules_own(command: list[str]) -> None:
    proc = run(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    own = {"status": "python -m kfold.status", "blend": "python ensemble/blend.py",
           "score": "python -m submissions.score", "data": "python -m kfold.data.synthetic",
           "weights": "python -m kfold.weights convert",
           "train": "exp093_2.py"}[command[0]]
    assert proc.stdout.startswith(f"usage: {own}"), proc.stdout[:200]


@pytest.mark.e2e
def test_train_runs_the_experiment_script_and_passes_its_exit_code() -> None:
    """A bad --opts key reaches the script's own recipe check: the same one line and exit 2 as the script."""
    via_command = run("train", "exp093_5", "--preset", "smoke", "--opts", "optim.lrr", "1")
    direct = subprocess.run([sys.executable, "experiments/exp093_5.py", "--preset", "smoke", "--opts", "optim.lrr",
                             "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert via_command.returncode == direct.returncode == 2
    assert via_command.stderr == direct.stderr and "did you mean optim.lr" in direct.stderr
    by_path = run("train", str(REPO / "experiments" / "exp093_5.py"), "--preset", "smoke", "--opts", "optim.lrr", "1")
    assert by_path.stderr == direct.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["statsu"], ["unknown command 'statsu'", "did you mean status"]),
    (["train", "exp093_22"], ["experiments/exp093_22.py", "did you mean exp093_2"]),
    (["data", "synthetc"], ["unknown data command 'synthetc'", "did you mean synthetic"]),
    ([], ["usage: foldwise"]),
])
def test_bad_commands_are_one_error_line(args: list[str], words: list[str]) -> None:
    proc = run(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    if args:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in proc.stderr


def test_train_outside_the_repository_says_where_to_run(tmp_path: Path) -> None:
    proc = run("train", "exp093_2", cwd=tmp_path)
    assert proc.returncode == 2 and "run from the repository root" in proc.stderr
