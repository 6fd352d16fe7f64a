"""A distilled student: an ordinary experiment whose fold k learns from the fold-k models of a finished blend.

    python experiments/exp097_1.py [--baseline] [--submissions DIR] [--teacher-device cpu|cuda] [experiment flags]
    python -m ensemble.distill STUDENT [--runs-dir runs] [--submissions DIR]   # the report again

A student script runs here rather than in ``kfold.cli`` alone: the recipe and its teacher blend are checked, each
requested fold's teacher store is made by the teacher pass (``ensemble.teacher``; kept and reused, an existing
one checked against the blend record and every member file it came from), then the folds train through kfold
like any experiment's (in this process, as local jobs or as a SLURM array: the teacher passes run here first).
``--baseline`` also trains ``<student>_baseline``, the same recipe without distillation on the same folds; once
both are complete, ``ensemble.distill_report`` says what share of the blend's gain the student recovered.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble.record import BlendRecord, read_blend_record
from foldwise.cli import ArgumentParser, run_entry_point
from kfold.cli import build_parser, hear_ctrl_c, parse_args, parse_folds, resolve_recipe, run_experiment
from kfold.config import ConfigError, Recipe, load_recipe
from kfold.data.layout import DataRoot, open_root
from kfold.launch import drop_flags
from kfold.rundir import clear_fold, fold_dir
from kfold.splits import ensure_folds, folds_sha256, read_folds
from kfold.store.format import is_complete
from kfold.store.teacher import TEACHER_MANIFEST, TeacherError, check_teacher, teacher_dir
from kfold.validate import fit_recipe_to_root, validate_recipe

# The torch-heavy modules (the teacher pass, the report) are imported where they are used, so that --help, a bad
# flag or recipe value and a missing blend record are answered as quickly as by any experiment script.
OWN_FLAGS = {"--baseline": 0, "--submissions": 1, "--teacher-device": 1}  # flag -> values; not the fold jobs'


def student_parser() -> ArgumentParser:
    """An experiment's command line plus a student's own flags."""
    parser = build_parser()
    parser.description = "Train and predict the folds of a student distilled from a finished blend."
    parser.add_argument("--baseline", action="store_true",
                        help="also train <name>_baseline (the recipe without distillation) for the recovered-gain "
                             "report")
    parser.add_argument("--submissions", default="submissions", help="folder of the teacher blend's record")
    parser.add_argument("--teacher-device", choices=("cpu", "cuda"),
                        help="where the teacher pass and the report's timing run (default: cuda when visible)")
    return parser


def _without(argv: Sequence[str], drop_distill_opts: bool) -> list[str]:
    """``argv`` less this module's flags (and, for the baseline, the ``--opts`` pairs of ``distill.*`` keys)."""
    out, items, i, in_opts = [], drop_flags(argv, OWN_FLAGS), 0, False
    while i < len(items):
        if items[i].startswith("--"):
            in_opts = items[i] == "--opts"
        elif in_opts and drop_distill_opts and items[i].startswith("distill."):
            i += 2  # the key and its value
            continue
        out.append(items[i])
        i += 1
    # an --opts left with no pairs
    return [a for j, a in enumerate(out) if a != "--opts" or (j + 1 < len(out) and not out[j + 1].startswith("--"))]


def device_or_default(device: str | None) -> str:
    """``cuda`` when asked for or, by default, when one is visible; else ``cpu``."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def prepare_teacher(recipe: Recipe, root: DataRoot, fold_of: dict[str, int], fold: int, record: BlendRecord,
                    record_path: Path, args: Any) -> None:
    """Fold k's teacher store, made once: an existing one is checked (and, under ``--retrain``, made again with
    the fold when its provenance no longer holds); a missing one is made by the teacher pass."""
    from ensemble.teacher import check_parameters, teacher_pass

    train_ids = [i for i in root.train_ids if fold_of[i] != fold]
    folder = teacher_dir(args.out, recipe.name, fold)
    teacher, pseudo = recipe.distill.teacher, recipe.distill.pseudo_test
    if (folder / TEACHER_MANIFEST).is_file():
        try:
            manifest = check_teacher(folder, fold, teacher, train_ids, pseudo, Path(args.out))
            check_parameters(manifest, record, fold, folder / TEACHER_MANIFEST)
            return
        except TeacherError as err:
            if not args.retrain:
                raise TeacherError(f"{err}; --retrain makes fold {fold}'s teacher targets and trains the fold "
                                   f"again") from None
            clear_fold(fold_dir(args.out, recipe.name, fold))  # its targets are made again below
            print(f"{recipe.name} fold {fold}: cleared for --retrain, its teacher targets no longer hold: "
                  f"{str(err).split(': ', 1)[1]}")
    manifest = teacher_pass(record, record_path, Path(args.out), root, folds_sha256(root), fold, train_ids, pseudo,
                            folder, device_or_default(args.teacher_device), wait=args.wait)
    counts = ", ".join(f"{n} {split}" for split, n in manifest["n"].items())
    print(f"{recipe.name} fold {fold}: teacher targets of {teacher} fold {fold} ({counts} images, "
          f"{manifest['seconds']:.1f} s) -> {folder}")


def run_student(name: str, base: dict[str, Any], args: Any, argv: Sequence[str]) -> int:
    """Check, make the teacher stores, train the student (and ``--baseline``), then report when all is complete."""
    recipe = validate_recipe(resolve_recipe(name, base, args))
    if not recipe.distill.teacher:
        raise ConfigError("distill.teacher: a student names its teacher blend (submissions/<name>.json); set it "
                          "with --opts distill.teacher NAME")
    record_path = Path(args.submissions) / f"{recipe.distill.teacher}.json"
    record = read_blend_record(record_path)
    root = open_root(recipe.data.root, class_map=recipe.data.class_map)
    fit_recipe_to_root(recipe, root)
    if list(record.classes) != list(root.classes):
        raise ConfigError(f"{record_path}: the blend's classes {record.classes} are not {root.path}'s {root.classes}")
    if record.folds != recipe.data.k_folds:
        raise ConfigError(f"{record_path}: the blend has {record.folds} folds, data.k_folds is {recipe.data.k_folds}")
    ensure_folds(root, recipe.data.k_folds, recipe.data.fold_seed)
    fold_of = read_folds(root)
    for fold in parse_folds(args.fold, recipe.data.k_folds):
        prepare_teacher(recipe, root, fold_of, fold, record, record_path, args)
    code = run_experiment(name, base, args, _without(argv, drop_distill_opts=False))
    from ensemble.distill_report import BASELINE_SUFFIX, distill_report

    baseline = f"{name}{BASELINE_SUFFIX}"
    if args.baseline:
        baseline_argv = _without(argv, drop_distill_opts=True)
        code = code or run_experiment(baseline, {k: v for k, v in base.items() if not k.startswith("distill.")},
                                      parse_args(baseline_argv), baseline_argv)
    done = [all(is_complete(fold_dir(args.out, exp, k)) for k in range(recipe.data.k_folds))
            for exp in (name, baseline)]
    if all(done):
        distill_report(Path(args.out), name, record_path, root, device_or_default(args.teacher_device))
    elif done[0]:
        print(f"{name}: no complete baseline for the recovered-gain report; run again with --baseline")
    return code


def student_main(name: str, base: dict[str, Any], argv: Sequence[str] | None = None) -> int:
    """Entry point of a student's experiment script (``experiments/exp097_1.py``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = student_parser().parse_args(argv)
    hear_ctrl_c()
    return run_entry_point(lambda: run_student(name, base, args, argv), args.debug,
                           interrupted="interrupted: finished folds and teacher stores are kept; run again with "
                                       "--resume to continue")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ensemble.distill STUDENT``: the recovered-gain report of a finished student and its baseline."""
    parser = ArgumentParser(prog="python -m ensemble.distill", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("student", help="the student experiment (its folds name their teacher blend)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--submissions", type=Path, default=Path("submissions"), help="folder of the blend record")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where the timing runs (default: cuda when visible)")
    args = parser.parse_args(argv)

    def body() -> int:
        from ensemble.distill_report import distill_report

        config = args.runs_dir / args.student / "fold0" / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{config}: not found; is {args.student!r} a trained experiment under "
                                    f"{args.runs_dir}?")
        recipe = load_recipe(config)
        if not recipe.distill.teacher:
            raise ConfigError(f"{config}: distill.teacher is null; {args.student!r} is not a distilled student")
        root = open_root(recipe.data.root, class_map=recipe.data.class_map)
        distill_report(args.runs_dir, args.student, args.submissions / f"{recipe.distill.teacher}.json", root,
                       device_or_default(args.device))
        return 0

    return run_entry_point(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
