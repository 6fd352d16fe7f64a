"""The ``foldwise`` command: one name for every entry point, each subcommand the module it names.

``foldwise status ...`` is ``python -m kfold.status ...``, ``foldwise train exp093_5 ...`` is
``python experiments/exp093_5.py ...``: the arguments pass through untouched, so each subcommand's ``--help``,
errors and exit codes are the module's own. Modules are found by name when a subcommand runs, which keeps
this leaf free of imports of the packages it dispatches to (and ``foldwise --help`` free of torch).
"""

from __future__ import annotations

import difflib
import importlib
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

# subcommand -> (module whose main(argv) it runs, one line of help); groups take a second word.
COMMANDS: dict[str, tuple[str, str]] = {
    "status": ("kfold.status", "where every fold of every experiment stands"),
    "report": ("kfold.report", "re-make experiment reports (OOF mIoU, per-class IoU, plots)"),
    "blend": ("ensemble.blend", "fit temperatures and weights on the OOF stores, write the submission"),
    "search": ("kfold.search.cli", "search recipes (Optuna trials of k folds, pruned, selection-corrected)"),
    "compare": ("ensemble.compare", "is B really better than A? a paired test over the folds"),
    "distill": ("ensemble.distill", "a distilled student's recovered-gain report and speed ratio, again"),
    "predict": ("ensemble.predict", "a finished or exported blend on new images"),
    "export": ("ensemble.export", "a blend as a self-contained folder"),
    "score": ("submissions.score", "local leaderboard score of a submission CSV"),
    "leaderboard": ("submissions.leaderboard", "show the leaderboard, record a public LB score"),
}
GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    "data": {
        "synthetic": ("kfold.data.synthetic.writer", "make the embedded synthetic RGB-D rooms dataset"),
        "nyuv2": ("kfold.data.nyuv2", "import the official nyu_depth_v2_labeled.mat"),
        "shards": ("kfold.data.shards", "webdataset shards of a root's train split (data.streaming)"),
        "splits": ("kfold.splits", "write a root's folds.csv"),
    },
    "weights": {
        "convert": ("kfold.weights", "rename a foreign checkpoint's keys into a safetensors file"),
    },
}
TRAIN_HELP = "train and predict the folds of an experiment (a name in experiments/ or a script's path)"
GROUP_HELP = {"data": "make or prepare a dataset root", "weights": "initial weights from other checkpoints"}
# A group whose module has its own subcommands gets the second word passed on (kfold.weights convert ...).
PASS_SUBCOMMAND = {"weights"}


def _usage() -> str:
    rows = [("train EXPERIMENT", TRAIN_HELP)]
    rows += [(name, text) for name, (_, text) in COMMANDS.items()]
    for group, subs in GROUPS.items():
        rows += [(f"{group} {sub}", text) for sub, (_, text) in subs.items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = ["usage: foldwise COMMAND [ARGS ...]   (foldwise COMMAND --help: that command's own options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}{text}" for name, text in rows]
    return "\n".join(lines)


def _error(message: str) -> int:
    print(f"error: {message} (see foldwise --help)", file=sys.stderr)
    return 2


def _unknown(word: str, known: Sequence[str], what: str) -> int:
    close = difflib.get_close_matches(word, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; {what}s are {', '.join(known)}"
    return _error(f"unknown {what} {word!r}{hint}")


def experiment_script(name: str, experiments_dir: Path = Path("experiments")) -> Path:
    """The script of an experiment given by name (``experiments/<name>.py``) or by path."""
    path = Path(name)
    if path.suffix != ".py":
        path = experiments_dir / f"{name}.py"
    if path.is_file():
        return path
    known = sorted(p.stem for p in experiments_dir.glob("*.py")) if experiments_dir.is_dir() else []
    close = difflib.get_close_matches(path.stem, known, n=1)
    if close:
        where = f"; did you mean {close[0]}?"
    elif known:
        where = f"; experiments are {', '.join(known)}"
    else:
        where = f" (run from the repository root, where {experiments_dir}/ is)"
    raise FileNotFoundError(f"{path}: no such experiment script{where}")


def _train(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: foldwise train EXPERIMENT [--fold ...] [options]\n\n{TRAIN_HELP}.\n"
              "foldwise train EXPERIMENT --help lists the options (the experiment script's own).")
        return 0 if args else 2
    try:
        script = experiment_script(args[0])
    except FileNotFoundError as err:
        return _error(str(err))
    sys.argv = [str(script), *args[1:]]  # as `python experiments/<name>.py ARGS` sees them
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def _run_module(module: str, args: list[str]) -> int:
    return importlib.import_module(module).main(args) or 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``foldwise COMMAND ARGS``; returns the command's exit code (2 for an unknown command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "train":
        return _train(rest)
    if command in COMMANDS:
        return _run_module(COMMANDS[command][0], rest)
    if command in GROUPS:
        subs = GROUPS[command]
        if not rest or rest[0] in ("-h", "--help"):
            lines = [f"usage: foldwise {command} {{{','.join(subs)}}} [ARGS ...]", "", f"{GROUP_HELP[command]}:"]
            lines += [f"  {sub:<12}{text}" for sub, (_, text) in subs.items()]
            print("\n".join(lines), file=sys.stdout if rest else sys.stderr)
            return 0 if rest else 2
        if rest[0] not in subs:
            return _unknown(rest[0], list(subs), f"{command} command")
        module = subs[rest[0]][0]
        return _run_module(module, rest if command in PASS_SUBCOMMAND else rest[1:])
    return _unknown(command, ["train", *COMMANDS, *GROUPS], "command")


if __name__ == "__main__":
    sys.exit(main())
