"""The command line every experiment script shares: one recipe, k folds, train -> predict -> report.

Everything up to the recipe check imports no torch, smp or timm: ``--help``, a mistyped ``--opts`` key and
an out-of-range value are answered in well under a second.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldwise.cli import ArgumentParser, run_entry_point
from kfold.config import PRESETS, ConfigError, Recipe, build_recipe, load_recipe, parse_opts, set_key, tracker_list
from kfold.launch import add_launcher_args, check_launcher_args, launch
from kfold.rundir import FoldLock, clear_fold, describe_difference, fold_dir, recipe_differences, write_config
from kfold.store.format import is_complete
from kfold.track import prepare_experiment, wandb_sync_hint
from kfold.validate import fit_recipe_to_root, validate_recipe

if TYPE_CHECKING:
    from kfold.data.layout import DataRoot
    from kfold.distributed import DistInfo
    from kfold.store.teacher import TeacherTargets

log = logging.getLogger("kfold")
STORE_FILES = ("oof.npy", "test.npy", "model.safetensors")  # a fold's trackers name these by path and sha256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> ArgumentParser:
    """The experiment scripts' command line (``ensemble.distill`` adds a student's own flags to it)."""
    p = ArgumentParser(description="Train and predict the folds of one experiment.")
    p.add_argument("--fold", default="all", help="'all' (default), one fold '0' or a list '0,2,4'")
    p.add_argument("--data-root", "--data_root", dest="data_root", help="dataset root (default: data.root)")
    p.add_argument("--preset", default="full", choices=tuple(PRESETS),
                   help="full (the reference recipe, default), demo (CPU-sized) or smoke (seconds)")
    p.add_argument("--config", help="repeat a run: read the recipe from its config.yaml (presets are not applied)")
    p.add_argument("--batch_size", "--batch-size", type=int)
    p.add_argument("--num_workers", "--num-workers", type=int)
    p.add_argument("--buffer_batches", "--buffer-batches", type=int,
                   help="data.buffer_batches: shuffle buffer of a streamed (data.streaming) run, in batches")
    p.add_argument("--weights_path", "--weights-path", help="initial weights (.safetensors or checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue unfinished folds from their last.pt")
    p.add_argument("--predict-only", "--predict_only", action="store_true",
                   help="skip training: predict OOF and test from each fold's model.safetensors")
    p.add_argument("--out", default="runs", help="runs folder (default: runs)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="override recipe keys, e.g. optim.lr 3e-4")
    p.add_argument("--track", type=tracker_list, metavar="NAMES",
                   help="train.track: mirror each fold's metrics to tensorboard, mlflow and/or wandb, e.g. "
                        "tensorboard,mlflow ('none': no tracker)")
    p.add_argument("--wait", action="store_true",
                   help="when another process is writing a fold, wait for it instead of refusing")
    p.add_argument("--retrain", action="store_true",
                   help="retrain folds that finished (or started) under a different recipe, discarding their results")
    add_launcher_args(p)
    return p


def resolve_recipe(name: str, base: dict[str, Any], args: argparse.Namespace) -> Recipe:
    """Defaults, preset, the experiment's differences, then command-line flags and ``--opts``."""
    opts = parse_opts(args.opts)
    recipe = load_recipe(args.config) if args.config else build_recipe(base, args.preset)
    recipe.name = name
    flags = {"data.root": args.data_root, "train.batch_size": args.batch_size, "data.num_workers": args.num_workers,
             "data.buffer_batches": args.buffer_batches, "train.track": args.track}
    for key, value in {**{k: v for k, v in flags.items() if v is not None}, **opts}.items():
        set_key(recipe, key, value)
    return recipe


def parse_folds(text: str, k: int) -> list[int]:
    if text == "all":
        return list(range(k))
    try:
        folds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--fold: expected 'all' or fold numbers like 0,2,4, got {text!r}") from None
    bad = [f for f in folds if not 0 <= f < k]
    if bad:
        raise ConfigError(f"--fold: fold {bad[0]} is outside 0..{k - 1}")
    return folds


def setup_logging(run_dir: Path, dist: DistInfo) -> None:
    log.handlers.clear()
    log.setLevel(logging.INFO if dist.is_main else logging.WARNING)
    log.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)


def run_fold(recipe: Recipe, root: DataRoot, fold: int, fold_of: dict[str, int], args: argparse.Namespace,
             dist: DistInfo, notes: list[str]) -> None:
    """Train (unless ``--predict-only``) and predict one fold, holding its lock; ``notes`` go to its log first."""
    run_dir = fold_dir(args.out, recipe.name, fold)
    lock = FoldLock(run_dir).acquire(wait=args.wait) if dist.is_main else None  # before the first write
    try:
        if args.wait and not dist.enabled:  # what we waited for may have finished the fold meanwhile
            from kfold.splits import folds_sha256

            if not folds_to_run(recipe, [fold], args, root.path, folds_sha256(root)):
                return
        _train_and_predict(recipe, root, fold, fold_of, args, dist, notes, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _train_and_predict(recipe: Recipe, root: DataRoot, fold: int, fold_of: dict[str, int], args: argparse.Namespace,
                       dist: DistInfo, notes: list[str], run_dir: Path) -> None:
    """The fold's work, under its lock: config.yaml, training, the OOF and test stores."""
    from kfold.distributed import barrier
    from kfold.models import amp_dtype, load_weights, model_from_recipe
    from kfold.plots import plot_curves
    from kfold.splits import folds_sha256
    from kfold.store.write import format_final_table, predict_fold
    from kfold.track import final_summary, open_fold
    from kfold.train import fit_fold

    train_ids = [i for i in root.train_ids if fold_of[i] != fold]
    val_ids = [i for i in root.train_ids if fold_of[i] == fold]
    setup_logging(run_dir, dist)
    for note in notes:
        log.info(note)
    teacher = fold_teacher(recipe, args.out, fold, train_ids)  # before the first write of a distilled fold
    if dist.is_main:
        for stale in run_dir.glob(".*.tmp"):  # left by a killed write; never read, only taking space
            stale.unlink(missing_ok=True)
        write_config(run_dir, recipe, root.path, fold, folds_sha256(root), parse_opts(args.opts))
    tracking = open_fold(recipe, args.out, fold) if dist.is_main and recipe.train.track else None
    try:
        if not args.predict_only:
            log.info("%s fold %d: %d train / %d validation images -> %s", recipe.name, fold, len(train_ids),
                     len(val_ids), run_dir)
            fit_fold(recipe, root, run_dir, train_ids, val_ids, dist, resume=args.resume,
                     weights_path=args.weights_path, on_row=tracking.log_row if tracking else None, teacher=teacher)
            if dist.is_main:
                plot_curves(run_dir / "metrics.csv", run_dir / "plots" / "curves.png")
        barrier()
        if dist.is_main:
            weights = run_dir / "model.safetensors"
            if not weights.exists():
                raise FileNotFoundError(f"{weights}: no trained weights to predict from (train this fold first)")
            model = model_from_recipe(recipe, root.num_classes, pretrained=False).to(dist.device)
            load_weights(model, weights)
            result = predict_fold(model, recipe, root, fold, val_ids, run_dir, dist.device, folds_sha256(root),
                                  recipe.name, amp=amp_dtype(recipe.train.amp, dist.device),
                                  teacher=teacher.citation() if teacher else None)
            log.info("%s fold %d: OOF mIoU %.4f (TTA, full resolution)", recipe.name, fold, result["oof_miou"])
            log.info("final metrics (%s):\n%s", run_dir / "final_metrics.csv",
                     format_final_table((run_dir / "final_metrics.csv").read_text()))
            if tracking:
                tracking.finish(final_summary(result), {f: run_dir / f for f in STORE_FILES})
    except BaseException:
        if tracking:
            tracking.finish({}, ok=False)
        raise
    barrier()


def fold_teacher(recipe: Recipe, out: str, fold: int, train_ids: list[str]) -> TeacherTargets | None:
    """A distilled recipe's teacher targets for ``fold`` (made by its script's teacher pass, ``ensemble.distill``),
    checked against every provenance rule; None when the recipe has no teacher."""
    if not recipe.distill.teacher:
        return None
    from kfold.store.teacher import open_teacher, teacher_dir

    folder = teacher_dir(out, recipe.name, fold)
    teacher = open_teacher(folder, fold, recipe.distill.teacher, train_ids, recipe.distill.pseudo_test, Path(out))
    log.info("distill: fold %d learns from %s (blend %s: %s, fold %d models only)", fold, folder,
             recipe.distill.teacher, ", ".join(m["experiment"] for m in teacher.manifest["members"]), fold)
    return teacher


def check_initial_weights(path: str, recipe: Recipe, num_classes: int) -> None:
    """``--weights_path`` read and fitted to the recipe's model (on the CPU) before anything is written: a
    missing file, a folder, a pickle or keys that fit nothing are one line naming the flag and the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--weights_path {path}: {'a folder, not a file' if file.is_dir() else 'no such file'}")
    from kfold.models import model_from_recipe
    from kfold.weights import init_from

    try:
        init_from(model_from_recipe(recipe, num_classes, pretrained=False), file, recipe.model.init_key_map)
    except (OSError, ValueError) as err:
        raise ValueError(f"--weights_path: {err}") from None


def folds_to_run(recipe: Recipe, folds: list[int], args: argparse.Namespace, root_path: Path,
                 folds_digest: str | None) -> list[int]:
    """The requested folds that need work; refuses to reuse a fold recorded under a different recipe.

    A complete fold is skipped when its ``config.yaml`` matches the recipe (result-neutral keys aside); one
    that differs, or an unfinished one to ``--resume`` that differs, is an error naming the keys, unless
    ``--retrain`` (then its folder is cleared and the fold trains from scratch).
    """
    todo = []
    for fold in folds:
        run_dir = fold_dir(args.out, recipe.name, fold)
        if not args.wait:
            FoldLock(run_dir).probe()  # a fold being written now is refused before anything is launched
        complete = is_complete(run_dir)
        # A fold started but never checkpointed has nothing to resume: it does not hold a later launch to its recipe.
        recorded = complete or (args.resume and all((run_dir / f).is_file() for f in ("last.pt", "config.yaml")))
        differs = recipe_differences(run_dir, recipe, root_path, folds_digest) if recorded else []
        if args.predict_only:  # predicting again with other TTA or store settings is what it is for
            differs = [k for k in differs if not k.startswith(("tta.", "oof."))]
        if differs and not args.retrain:
            state = "finished" if complete else "started"
            raise ConfigError(
                f"{run_dir}: {state} under a different recipe ({describe_difference(run_dir, recipe, differs)}); "
                f"use another experiment name or --out, or --retrain to train it again")
        if differs:
            todo.append(fold)
        elif complete and not args.predict_only:
            print(f"{recipe.name} fold {fold}: complete, skipped ({run_dir / 'manifest.json'})")
        else:
            todo.append(fold)
    return todo


def clear_for_retrain(recipe: Recipe, folds: list[int], args: argparse.Namespace, root_path: Path,
                      folds_digest: str) -> None:
    """``--retrain``: clear the folds recorded under a different recipe (manifest first)."""
    for fold in folds:
        run_dir = fold_dir(args.out, recipe.name, fold)
        if (run_dir / "config.yaml").is_file() and recipe_differences(run_dir, recipe, root_path, folds_digest):
            clear_fold(run_dir)
            print(f"{recipe.name} fold {fold}: cleared for --retrain")


def report_once(out: Path, recipe: Recipe, root: DataRoot) -> None:
    """Make the experiment report and the fold-mean test store (``test_mean.npy``) unless a report newer than
    every fold's manifest exists; one process at a time.

    Several fold jobs may finish together and each sees every fold complete: the lock and the check make
    them exactly once, by whichever gets there first.
    """
    from kfold.report import experiment_report
    from kfold.track import finish_experiment

    name = recipe.name
    exp_dir = Path(out) / name
    with open(exp_dir / ".report.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = exp_dir / "leaderboard_row.json"
        manifests = [p.stat().st_mtime for p in exp_dir.glob("fold*/manifest.json")]
        if marker.is_file() and manifests and marker.stat().st_mtime >= max(manifests):
            return
        report = experiment_report(Path(out), name, root)
        from kfold.store.read import open_experiment
        from kfold.store.write import write_test_mean

        write_test_mean(open_experiment(out, name), recipe.oof.keep_fold_test)
        finish_experiment(recipe, out, {"oof_miou": report["oof_miou"], "oof_pixel_acc": report["pixel_acc"],
                                        **{f"oof_iou/{c}": v for c, v in report["per_class_iou"].items()}})


def run_experiment(name: str, base: dict[str, Any], args: argparse.Namespace, argv: list[str] | None = None) -> int:
    if args.retrain and args.predict_only:
        raise ConfigError("--retrain and --predict-only exclude each other: one trains again, the other does not train")
    check_launcher_args(args)
    recipe = validate_recipe(resolve_recipe(name, base, args))
    folds = parse_folds(args.fold, recipe.data.k_folds)
    from kfold.data.layout import open_root
    from kfold.splits import ensure_folds, folds_sha256, read_folds

    if args.launcher != "none":  # the jobs import the training stack; the launcher needs only the run folders
        root = open_root(recipe.data.root, class_map=recipe.data.class_map)
        fit_recipe_to_root(recipe, root)
        if args.weights_path and not args.predict_only:
            check_initial_weights(args.weights_path, recipe, root.num_classes)
        ensure_folds(root, recipe.data.k_folds, recipe.data.fold_seed)
        todo = folds_to_run(recipe, folds, args, root.path, folds_sha256(root))
        if args.retrain:
            clear_for_retrain(recipe, todo, args, root.path, folds_sha256(root))
        if todo:
            prepare_experiment(recipe, args.out)
        code = launch(name, base, args, todo, list(sys.argv[1:] if argv is None else argv))
        hint = wandb_sync_hint(Path(args.out) / name) if "wandb" in recipe.train.track and todo else None
        if hint and args.launcher == "local":
            print(hint)
        return code
    # The training stack is imported only once the command line and the recipe are known to be good.
    from kfold.distributed import barrier, cleanup, setup_distributed

    dist = setup_distributed()
    if recipe.model.encoder_weights is None and args.preset == "full" and not args.weights_path:
        warnings.warn("model.encoder_weights is null: the encoder starts from random weights", stacklevel=1)
    if args.preset == "full" and dist.device.type == "cpu" and not args.config:
        warnings.warn("the full preset on a machine without a GPU will be very slow; "
                      "try --preset demo for a CPU-sized run", stacklevel=1)
    root = open_root(recipe.data.root, class_map=recipe.data.class_map)
    notes = fit_recipe_to_root(recipe, root)
    if args.weights_path and not args.predict_only:
        check_initial_weights(args.weights_path, recipe, root.num_classes)
    if dist.is_main:
        ensure_folds(root, recipe.data.k_folds, recipe.data.fold_seed)
    barrier()
    fold_of = read_folds(root)
    todo = folds_to_run(recipe, folds, args, root.path, folds_sha256(root))
    if args.retrain and dist.is_main:
        clear_for_retrain(recipe, todo, args, root.path, folds_sha256(root))
    if todo and dist.is_main:
        prepare_experiment(recipe, args.out)
    for fold in todo:
        barrier()
        run_fold(recipe, root, fold, fold_of, args, dist, notes)
    if dist.is_main and all(is_complete(fold_dir(args.out, name, k)) for k in range(recipe.data.k_folds)):
        report_once(Path(args.out), recipe, root)
    cleanup()
    return 0


def hear_ctrl_c() -> None:
    """Background jobs of a non-interactive shell (make demo trains two at once) start with SIGINT ignored;
    without this, Ctrl-C in the terminal would leave them training."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(name: str, base: dict[str, Any], argv: list[str] | None = None) -> int:
    """Entry point of an experiment script.

    Args:
        name: the experiment name (its runs folder).
        base: the experiment's differences from the reference recipe, as dotted keys.
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    args = parse_args(argv)
    hear_ctrl_c()
    return run_entry_point(lambda: run_experiment(name, base, args, argv), args.debug,
                           interrupted="interrupted: finished folds are kept; run again with --resume to continue")
