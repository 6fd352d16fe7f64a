"""Recipe search: Optuna trials that are k-fold runs, pruned fold by fold, with a selection-corrected score.

    python -m kfold.search exp093_2 --space space.yaml --trials 20 --launcher local --jobs 2
    python -m kfold.search exp093_2 --space space.yaml --trials 20 --storage journal:/shared/s.log --workers 4

The command line, the experiment's recipe and the space are checked before Optuna or torch is imported: a bad
space is one ``error:`` line. Running the same command again continues the study: finished trials stay, a trial
whose worker died is failed and its parameters retried in its own run folder, finished folds are not trained
again. Trial folders: ``<out>/<study>/t<NNN>/fold<k>/``, experiments like any other (``--runs <study>/t007``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import runpy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foldwise.cli import NAME, ArgumentParser, at_least, run_entry_point
from foldwise.commands import experiment_script
from kfold.config import PRESETS, ConfigError, build_recipe, parse_opts, set_key, tracker_list
from kfold.launch import add_launcher_args, check_launcher_args, launcher_argv
from kfold.search.space import read_space
from kfold.search.study import PRUNERS, SAMPLERS
from kfold.validate import validate_recipe

WAIT_S = 5.0  # a worker with nothing to start waits this long for the running trials to end
MAX_INVALID = 10


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m kfold.search", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="an experiment name in experiments/ (or a script's path)")
    p.add_argument("--space", required=True, help="YAML: recipe key -> {float|int: [low, high], log, step} "
                                                  "or {choice: [...]}")
    p.add_argument("--trials", type=at_least(1), required=True, help="complete + pruned trials to end with")
    p.add_argument("--study", help="study name and runs sub-folder (default <experiment>_search)")
    p.add_argument("--storage", help="default: SQLite in the study folder; journal:PATH (a shared file system); "
                                     "or a SQLAlchemy URL (postgresql://..., mysql://...)")
    p.add_argument("--workers", type=at_least(1), default=1, help="processes running trials side by side")
    p.add_argument("--pruner", choices=PRUNERS, default="wilcoxon",
                   help="wilcoxon: paired folds against the best trial (default); median: the other trials' "
                        "median on the same fold; none")
    p.add_argument("--prune-p", type=float, default=0.1, help="wilcoxon: prune below this p-value (default 0.1)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--seed", type=at_least(0), default=0, help="the sampler's seed (training seeds are the recipe's)")
    p.add_argument("--preset", default="full", choices=tuple(PRESETS))
    p.add_argument("--data-root", "--data_root", dest="data_root")
    p.add_argument("--out", default="runs", help="runs folder (default: runs)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="fixed overrides of every trial")
    p.add_argument("--track", type=tracker_list, metavar="NAMES", help="trackers of every trial's folds")
    add_launcher_args(p)
    args = p.parse_args(argv)
    if args.study is not None and not NAME.fullmatch(args.study):
        p.error(f"--study {args.study!r}: use letters, digits and . _ + - only")
    if not 0 < args.prune_p < 1:
        p.error(f"--prune-p {args.prune_p}: must be in (0, 1)")
    return args


def plan(args: argparse.Namespace, raw_argv: Sequence[str]) -> dict[str, Any]:
    """Everything checked before any trial: the experiment, its resolved recipe, the space, the launcher flags."""
    check_launcher_args(args)
    if not Path(args.space).is_file():
        raise FileNotFoundError(f"--space {args.space}: no such file")
    script = experiment_script(args.experiment)
    base = runpy.run_path(str(script), run_name="kfold.search.experiment").get("RECIPE")
    if not isinstance(base, dict):
        raise ConfigError(f"{script}: no RECIPE dict (an experiment script defines RECIPE = {{key: value}})")
    fixed = parse_opts(args.opts)
    recipe = build_recipe(base, args.preset)
    for key, value in {**({"data.root": args.data_root} if args.data_root else {}),
                       **({"train.track": args.track} if args.track is not None else {}), **fixed}.items():
        set_key(recipe, key, value)
    validate_recipe(recipe)
    space = read_space(args.space, recipe)
    clash = sorted({d.key for d in space} & set(fixed))
    if clash:
        raise ConfigError(f"{args.space}: {clash[0]} is searched and also fixed by --opts; keep one")
    study = args.study or f"{script.stem}_search"
    # The trial's command line: the user's launcher flags as typed, then the fixed --opts (parameters follow).
    argv = ["--preset", args.preset, "--data-root", recipe.data.root, "--out", args.out, "--wait",
            *launcher_argv(raw_argv), *(["--track", ",".join(args.track) or "none"] if args.track is not None else []),
            "--opts", *args.opts]
    return {"script": script, "experiment": script.stem, "base": base, "recipe": recipe, "space": space,
            "study": study, "argv": argv}


def open_search(args: argparse.Namespace, checked: dict[str, Any], worker: int = 0) -> tuple[Any, Any]:
    """(the study, the shared setup of its trials); the data root's folds are made once, before any trial.

    The sampler's seed is ``--seed`` mixed with the worker's index and the number of trials the study already
    holds: a fresh study run by one worker repeats exactly, and neither a second worker nor a continued study
    proposes again the recipes the first one did (a sampler restarted on the same seed would).
    """
    import optuna

    from kfold.data.layout import open_root
    from kfold.search.study import make_pruner, make_sampler, open_storage
    from kfold.search.trials import SearchSetup
    from kfold.splits import ensure_folds, folds_sha256

    recipe = checked["recipe"]
    root = open_root(recipe.data.root, class_map=recipe.data.class_map)
    ensure_folds(root, recipe.data.k_folds, recipe.data.fold_seed)
    study_dir = Path(args.out) / checked["study"]
    study = optuna.create_study(storage=open_storage(args.storage, study_dir), study_name=checked["study"],
                                direction="maximize", load_if_exists=True,
                                pruner=make_pruner(args.pruner, args.prune_p))
    seed = np.random.SeedSequence([args.seed, worker, len(study.get_trials(deepcopy=False))]).generate_state(1)[0]
    study.sampler = make_sampler(args.sampler, int(seed))
    space_text = Path(args.space).read_text()
    made_for = study.user_attrs.get("experiment"), study.user_attrs.get("space")
    if made_for == (None, None):
        study.set_user_attr("experiment", checked["experiment"])
        study.set_user_attr("space", space_text)
    elif made_for != (checked["experiment"], space_text):
        raise ConfigError(f"study {checked['study']!r} was made for {made_for[0]} with another space; continue it "
                          f"with the same experiment and space, or give another --study")
    setup = SearchSetup(checked["study"], checked["experiment"], checked["base"], recipe, checked["space"],
                        checked["argv"], args.out, root.path, folds_sha256(root))
    return study, setup


def worker(args: argparse.Namespace, opened: tuple[Any, Any]) -> None:
    """Run trials until the study holds ``--trials`` complete or pruned ones (one process; several share it)."""
    from optuna.trial import TrialState

    from kfold.search.study import finished, retry_stale
    from kfold.search.trials import run_trial

    study, setup = opened
    invalid = 0  # sampled recipes in a row that the validator refused
    while True:
        for number in retry_stale(study):
            print(f"{setup.study}: trial {number}'s worker is gone: failed, its parameters queued again")
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        done = finished(study)
        if done >= args.trials:
            return
        if done + running >= args.trials:  # the last trials are running elsewhere: see whether they finish
            time.sleep(WAIT_S)
            continue
        invalid = invalid + 1 if run_trial(study, study.ask(), setup) == "FAIL" else 0
        if invalid >= MAX_INVALID:
            raise ConfigError(f"{args.space}: {invalid} sampled recipes in a row did not pass the recipe's validator "
                              f"(their reasons are in the trials table); narrow the space")


def _spawned_worker(argv: list[str], index: int) -> None:
    from foldwise.cli import one_line

    try:
        args = parse_args(argv)
        worker(args, open_search(args, plan(args, argv), index))
    except Exception as err:  # noqa: BLE001 - the controller reports how the worker ended
        print(f"error: worker: {one_line(err)}", file=sys.stderr)
        sys.exit(1)


def search(args: argparse.Namespace, argv: list[str]) -> int:
    checked = plan(args, argv)
    print(f"{checked['study']}: {args.trials} trials of {checked['experiment']} over "
          f"{', '.join(d.key for d in checked['space'])}; {args.workers} worker(s), pruner {args.pruner}, "
          f"runs in {Path(args.out) / checked['study']}", flush=True)
    if args.workers == 1:
        worker(args, open_search(args, checked))
    else:
        open_search(args, checked)  # the storage and the study exist before any worker starts
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=_spawned_worker, args=(argv, i), name=f"search-worker-{i}")
                 for i in range(args.workers)]
        for proc in procs:
            proc.start()
        try:
            for proc in procs:
                proc.join()
        except KeyboardInterrupt:
            for proc in procs:
                proc.terminate()
            raise
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            raise RuntimeError(f"{len(bad)} of {args.workers} workers ended with an error (exit codes {bad}); "
                               f"run the same command again to go on")
    from kfold.search.report import write_outputs
    from kfold.search.study import storage_url

    study, setup = open_search(args, checked)  # again: the workers' trials are in the storage, not in `opened`
    study_dir = Path(args.out) / checked["study"]
    print(write_outputs(study, study_dir, args.out, setup.k, storage_url(args.storage, study_dir)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return run_entry_point(lambda: search(args, argv), args.debug,
                           interrupted="interrupted: finished trials and folds are kept; run the same command again "
                                       "to continue the study")


if __name__ == "__main__":
    sys.exit(main())
