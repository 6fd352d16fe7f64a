"""The command line every experiment script shares: one recipe, k folds, train -> predict -> report."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import signal
import subprocess
import sys
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml

from kfold.config import ConfigError, Recipe, build_recipe, load_recipe, parse_opts, set_key, to_dict
from kfold.data.layout import DataRoot, open_root
from kfold.distributed import DistInfo, barrier, cleanup, setup_distributed
from kfold.io import write_text
from kfold.models import load_weights, model_from_recipe
from kfold.splits import ensure_folds, folds_sha256, read_folds

log = logging.getLogger("kfold")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train and predict the folds of one experiment.")
    p.add_argument("--fold", default="all", help="'all' (default), one fold '0' or a list '0,2,4'")
    p.add_argument("--data-root", "--data_root", dest="data_root", help="dataset root (default: data.root)")
    p.add_argument("--preset", default="full", help="full (the reference recipe), demo (CPU-sized) or smoke")
    p.add_argument("--config", help="repeat a run: read the recipe from its config.yaml (presets are not applied)")
    p.add_argument("--batch_size", "--batch-size", type=int)
    p.add_argument("--num_workers", "--num-workers", type=int)
    p.add_argument("--weights_path", "--weights-path", help="initial weights (.safetensors or checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue unfinished folds from their last.pt")
    p.add_argument("--predict-only", "--predict_only", action="store_true",
                   help="skip training: predict OOF and test from each fold's model.safetensors")
    p.add_argument("--out", default="runs", help="runs folder (default: runs)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="override recipe keys, e.g. optim.lr 3e-4")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def resolve_recipe(name: str, base: dict[str, Any], args: argparse.Namespace) -> Recipe:
    """Defaults, preset, the experiment's differences, then command-line flags and ``--opts``."""
    opts = parse_opts(args.opts)
    recipe = load_recipe(args.config) if args.config else build_recipe(base, args.preset)
    recipe.name = name
    flags = {"data.root": args.data_root, "train.batch_size": args.batch_size, "data.num_workers": args.num_workers}
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


def fold_complete(run_dir: Path) -> bool:
    manifest = run_dir / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_config(run_dir: Path, recipe: Recipe, root: DataRoot, fold: int) -> None:
    """``config.yaml``: the resolved recipe plus what is needed to trust and repeat the run."""
    packages = ["torch", "segmentation-models-pytorch", "timm", "albumentations", "numpy"]
    info = {"experiment": recipe.name, "fold": fold, "data_root": str(root.path.resolve()),
            "folds_sha256": folds_sha256(root), "git_commit": git_commit(), "command": sys.argv,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), **{p: version(p) for p in packages}},
            "recipe": to_dict(recipe)}
    write_text(run_dir / "config.yaml", yaml.safe_dump(info, sort_keys=False))


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
             dist: DistInfo) -> None:
    """Train (unless ``--predict-only``) and predict one fold."""
    from kfold.plots import plot_curves
    from kfold.predict import predict_fold  # prediction pulls in tta; keep `--help` fast
    from kfold.train import amp_dtype, fit_fold

    run_dir = Path(args.out) / recipe.name / f"fold{fold}"
    train_ids = [i for i in root.train_ids if fold_of[i] != fold]
    val_ids = [i for i in root.train_ids if fold_of[i] == fold]
    setup_logging(run_dir, dist)
    if dist.is_main:
        for stale in run_dir.glob(".*.tmp"):  # left by a killed write; never read, only taking space
            stale.unlink(missing_ok=True)
    if not args.predict_only:
        if dist.is_main:
            write_config(run_dir, recipe, root, fold)
        log.info("%s fold %d: %d train / %d validation images -> %s", recipe.name, fold, len(train_ids),
                 len(val_ids), run_dir)
        fit_fold(recipe, root, run_dir, train_ids, val_ids, dist, resume=args.resume,
                 weights_path=args.weights_path)
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
                              recipe.name, amp=amp_dtype(recipe.train.amp, dist.device))
        log.info("%s fold %d: OOF mIoU %.4f (TTA, full resolution)", recipe.name, fold, result["oof_miou"])
    barrier()


def run_experiment(name: str, base: dict[str, Any], args: argparse.Namespace) -> None:
    dist = setup_distributed()
    recipe = resolve_recipe(name, base, args)
    if recipe.model.encoder_weights is None and args.preset == "full" and not args.weights_path:
        warnings.warn("model.encoder_weights is null: the encoder starts from random weights", stacklevel=1)
    if args.preset == "full" and dist.device.type == "cpu" and not args.config:
        warnings.warn("the full preset on a machine without a GPU will be very slow; "
                      "try --preset demo for a CPU-sized run", stacklevel=1)
    root = open_root(recipe.data.root)
    if dist.is_main:
        ensure_folds(root, recipe.data.k_folds, recipe.data.fold_seed)
    barrier()
    fold_of = read_folds(root)
    for fold in parse_folds(args.fold, recipe.data.k_folds):
        run_dir = Path(args.out) / name / f"fold{fold}"
        if fold_complete(run_dir) and not args.predict_only:
            print(f"{name} fold {fold}: complete, skipped ({run_dir / 'manifest.json'})")
            continue
        run_fold(recipe, root, fold, fold_of, args, dist)
    if dist.is_main and all(fold_complete(Path(args.out) / name / f"fold{k}") for k in range(recipe.data.k_folds)):
        from kfold.report import experiment_report

        experiment_report(Path(args.out), name, root)
    cleanup()


def main(name: str, base: dict[str, Any], argv: list[str] | None = None) -> int:
    """Entry point of an experiment script.

    Args:
        name: the experiment name (its runs folder).
        base: the experiment's differences from the reference recipe, as dotted keys.
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    args = parse_args(argv)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Background jobs of a non-interactive shell (make demo trains two at once) start with SIGINT
        # ignored; without this, Ctrl-C in the terminal would leave them training.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run_experiment(name, base, args)
    except KeyboardInterrupt:
        print("interrupted: finished folds are kept; run again with --resume to continue", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if torch.cuda.is_available():  # pragma: no cover - GPU only
    torch.backends.cudnn.benchmark = True
