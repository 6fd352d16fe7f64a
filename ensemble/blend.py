"""Blend the OOF stores of complete experiments: weights and temperatures, nested-CV estimate, submission.

Usage (from the repo root):
    python ensemble/blend.py                            # every complete experiment under runs/
    python ensemble/blend.py --runs exp093_5 exp093_4 --method hillclimb --name my_blend --dry-run
    python ensemble/blend.py --runs exp093_2 exp093_5 --per-class   # one weight per model and class

Weights and temperatures are fitted on a fixed class-stratified sample of OOF pixels held in RAM, then the
chosen blend is scored on every OOF pixel at full resolution; the nested-CV figure fits each fold's blend
on the other folds and scores the held-out fold at full resolution. Writes ``<out-dir>/<name>.csv``
(submission), ``<name>.json`` (record), ``plots/<name>_{weights,per_class}.png`` and refreshes
``<out-dir>/leaderboard.csv``. Exit 2 with one line ``error: ...`` on bad input (``--debug``: traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.nested import FoldResult, default_workers, fit_pool, nested_cv
from ensemble.optimize import METHODS, BlendOptions, BlendResult, fit_blend
from ensemble.passes import predict_test, release_freed_heap, score_full_res, warm_page_cache
from ensemble.plots import plot_per_class, plot_weights
from ensemble.record import BlendRecord
from ensemble.stores import Members, build_sample, open_members
from foldwise.cli import NAME, ArgumentParser, at_least, run_entry_point
from foldwise.io import check_writable
from foldwise.leaderboard import leaderboard_row
from kfold.config import tracker_list
from kfold.metrics import iou_per_class, mean_iou, pixel_accuracy
from kfold.track import TRACKERS, track_blend
from submissions.leaderboard import read_leaderboard, sync_experiment_rows, upsert_leaderboard
from submissions.score import score_submission
from submissions.writer import write_submission


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python ensemble/blend.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="folder of the experiments (default runs)")
    p.add_argument("--runs", nargs="+", metavar="EXP", default=None, help="experiments (default: every complete one)")
    p.add_argument("--method", choices=METHODS, default="slsqp")
    p.add_argument("--per-class", action="store_true",
                   help="slsqp: one weight per model and class, fitted from the global blend (kept if not beaten)")
    p.add_argument("--name", default=None, help="blend name (default blend_<method>_<members>)")
    p.add_argument("--data-root", type=Path, default=None, help="default: the data root the stores recorded")
    p.add_argument("--pixels", type=int, default=300_000, help="OOF pixel sample size for the fit")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--order", choices=("C", "F"), default="C", help="RLE pixel order of the submission")
    p.add_argument("--no-temperature", action="store_true", help="keep every temperature at 1")
    p.add_argument("--dry-run", action="store_true", help="report without writing anything")
    p.add_argument("--skip-broken", action="store_true",
                   help="without --runs: leave out experiments that look complete but cannot be read (the report "
                        "and the leaderboard row name them); by default such a blend is refused")
    p.add_argument("--track", type=tracker_list, default=[], metavar="NAMES",
                   help="log the blend to these trackers too: tensorboard, mlflow and/or wandb, e.g. mlflow,wandb")
    p.add_argument("--mlflow-uri", default=None, help="MLflow store (default sqlite:///<runs-dir>/mlflow.db)")
    p.add_argument("--out-dir", type=Path, default=Path("submissions"))
    p.add_argument("--chunk", type=int, default=4,
                   help="images per streamed chunk (memory: ~ chunk x members x the candidates' temperatures)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for the fits and the two passes over the images (default: one per fit, at most one "
                        "per CPU; 1 = no pool)")
    args = p.parse_args(argv)
    if args.name is not None and not NAME.fullmatch(args.name):
        p.error(f"--name {args.name!r}: use letters, digits and . _ + - only")
    if args.per_class and args.method != "slsqp":
        p.error(f"--per-class needs --method slsqp, got --method {args.method}")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.chunk < 1:
        p.error(f"--chunk must be >= 1, got {args.chunk}")
    if args.pixels < 1:
        p.error(f"--pixels must be >= 1, got {args.pixels}")
    unknown = [t for t in args.track if t not in TRACKERS]
    if unknown or len(set(args.track)) != len(args.track):
        p.error(f"--track {','.join(args.track)}: name each of {', '.join(TRACKERS)} at most once")
    return args


def check_outputs(out_dir: Path, name: str | None) -> None:
    """Before any work: the submission, record, plots and leaderboard can be written, and the leaderboard that
    will be updated reads (a malformed one is refused, not rewritten)."""
    board = out_dir / "leaderboard.csv"
    for path in [board] + ([out_dir / f"{name}.csv", out_dir / f"{name}.json"] if name else []):
        check_writable(path)
    if board.is_file():
        read_leaderboard(board)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """``fit_pool(workers)`` (None for one worker), shut down on leaving, pending work cancelled."""
    pool = fit_pool(workers)
    try:
        yield pool
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def default_name(method: str, names: Sequence[str]) -> str:
    """``blend_<method>_<a>+<b>`` (method e.g. ``slsqp`` or ``slsqp-per-class``); a digest of the member list
    when that grows long."""
    name = f"blend_{method}_{'+'.join(names)}"
    if len(name) > 80:
        name = f"blend_{method}_{len(names)}models_{hashlib.sha1(','.join(names).encode()).hexdigest()[:8]}"
    return name


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _scores(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    return {"miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm),
            "per_class_iou": dict(zip(classes, iou_per_class(cm).tolist()))}


def _chosen_label(chosen: str, names: Sequence[str]) -> str:
    if chosen.startswith("best_single:"):
        return f"best single ({names[int(chosen.split(':')[1])]})"
    return "global weights" if chosen == "global" else chosen


def method_label(method: str, per_class: bool) -> str:
    """``slsqp``, ``slsqp-per-class``, ``hillclimb`` or ``uniform``."""
    return method + ("-per-class" if per_class else "")


class Laps:
    """Seconds per named step, for the timings line."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step], self._clock = now - self._clock, now


def fit_with_nested(sample: Any, num_classes: int, folds: int, options: BlendOptions, pool: Executor | None
                    ) -> tuple[BlendResult, list[FoldResult]]:
    """The in-sample fit and the nested-CV fits; independent, so with a pool they run side by side."""
    fit_args = (sample.probs, sample.labels, sample.weights, num_classes, options)
    in_sample = pool.submit(fit_blend, *fit_args) if pool else None
    _, nested = nested_cv(sample.probs, sample.labels, sample.weights, sample.fold, num_classes, options, pool)
    fit = in_sample.result() if in_sample else fit_blend(*fit_args)
    if sorted(r.fold for r in nested) != list(range(folds)):
        raise ValueError(f"the pixel sample misses fold(s) {sorted(set(range(folds)) - {r.fold for r in nested})}; "
                         f"raise --pixels")
    return fit, nested


def score_oof(members: Members, fit: BlendResult, nested: list[FoldResult], chunk: int, pool: Executor | None,
              workers: int, keep_scores: bool) -> dict[str, np.ndarray]:
    """Full-resolution OOF confusion matrices of the blend, its nested estimate and each member.

    Per-class weights: the global blend they started from is scored too, in-sample and nested, so the
    report shows what the extra weights add.
    """
    k = members.folds
    blends = {"blend": dict.fromkeys(range(k), (fit.weights, fit.temperatures)),
              "nested": {r.fold: (r.fit.weights, r.fit.temperatures) for r in nested}}
    if "global" in fit.candidate_params and all("global" in r.fit.candidate_params for r in nested):
        blends["global"] = dict.fromkeys(range(k), fit.candidate_params["global"])
        blends["global_nested"] = {r.fold: r.fit.candidate_params["global"] for r in nested}
    return score_full_res(members, blends, chunk, score_members=True, pool=pool, workers=workers,
                          keep_scores=keep_scores)


def submit_and_score(members: Members, fit: BlendResult, args: argparse.Namespace, csv_path: Path,
                     laps: Laps, pool: Executor | None, workers: int) -> tuple[Any, dict[str, Any] | None]:
    """Write (or, dry run, only check) the submission; score it and each member on the test labels, if any."""
    C = members.num_classes
    if not members.root.test_ids:
        raise ValueError(f"{members.root.path}: no test images to predict")
    cm = member_cms = None
    if members.root.has_test_labels:
        cm, member_cms = np.zeros((C, C), dtype=np.int64), [np.zeros((C, C), dtype=np.int64) for _ in members.names]
    sample_sub = members.root.path / "sample_submission.csv"
    test_probs = predict_test(members, (fit.weights, fit.temperatures), args.chunk, cm, member_cms, pool, workers,
                              keep_scores=not args.dry_run)
    summary = write_submission(csv_path, test_probs, C, args.order, sample_sub if sample_sub.is_file() else None,
                               members.root.test_ids, args.dry_run)
    laps("submission")
    if cm is None:
        return summary, None
    labels_dir = members.root.path / "test_labels"
    if args.dry_run:  # nothing written: score the class maps directly
        test = {"miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm), "source": "direct (dry run)"}
    else:  # score what was written, as the leaderboard would
        s = score_submission(csv_path, labels_dir, C, args.order, members.root.class_map)
        test = {"miou": s["miou"], "pixel_acc": s["pixel_acc"], "source": f"{csv_path} vs {labels_dir}"}
    # Each member alone on the same test images (fold-averaged probabilities, T = 1).
    test["members"] = {n: {"miou": mean_iou(m), "pixel_acc": pixel_accuracy(m)}
                       for n, m in zip(members.names, member_cms)}
    laps("test score")
    return summary, test


def run(args: argparse.Namespace, log=lambda msg: print(msg, file=sys.stderr)) -> BlendRecord:
    """Fit, score and write one blend; return its record (what ``<name>.json`` holds)."""
    laps = Laps()
    if not args.dry_run:
        check_outputs(Path(args.out_dir), args.name)
    members, skipped = open_members(args.runs_dir, args.runs, args.data_root, make_test_mean=not args.dry_run,
                                    skip_broken=args.skip_broken)
    for line in skipped:
        log(line)
    left_out = [line.removeprefix("skipped broken ") for line in skipped if line.startswith("skipped broken ")]
    names, classes, C, k = members.names, members.classes, members.num_classes, members.folds
    if args.pixels < C:
        raise ValueError(f"--pixels {args.pixels} must be >= the number of classes ({C})")
    log(f"blending {', '.join(names)}: {k} folds, {len(members.ids)} train / {len(members.test_ids)} test images, "
        f"grid {members.grid} -> {members.image_size}, root {members.root.path}")
    laps("load")
    oof_files = [f for s in members.stores for f in s.store_files("oof")]
    with warm_page_cache(oof_files):  # the sample pass decodes labels and checks rows while the disk reads ahead
        sample = build_sample(members, args.pixels, args.seed, args.chunk)
    release_freed_heap()
    laps("sample")
    options = BlendOptions(args.method, fit_temperature=not args.no_temperature, per_class=args.per_class,
                           seed=args.seed)
    name = args.name or default_name(method_label(args.method, args.per_class), names)
    csv_path = Path(args.out_dir) / f"{name}.csv"
    if not args.dry_run:
        check_outputs(Path(args.out_dir), name)
    workers = args.workers or default_workers(k + 1)
    with worker_pool(workers) as pool:
        fit, nested = fit_with_nested(sample, C, k, options, pool)
    log(fit.message)
    laps("fit + nested")
    test_files = [f for s in members.stores for f in s.store_files("test")]
    oof_bytes = sum(f.stat().st_size for f in oof_files)
    # New workers for the passes: the fits' processes keep what their heaps grew to (peak heap of all
    # processes in bench/bench_blend_size.py).
    with worker_pool(workers) as pool, warm_page_cache(test_files, also_cached=oof_bytes) as warming:
        if warming:
            log(f"reading the test stores ({warming / 2**30:.1f} GiB) into the page cache during the OOF pass")
        cms = score_oof(members, fit, nested, args.chunk, pool, workers, keep_scores=not args.dry_run)
        laps("full-res scoring")
        summary, test = submit_and_score(members, fit, args, csv_path, laps, pool, workers)
    global_ = None
    if "global" in cms:
        global_ = {"weights": fit.candidate_params["global"][0].tolist(),
                   "temperatures": fit.candidate_params["global"][1].tolist(),
                   "oof": _scores(cms["global"], classes), "nested": _scores(cms["global_nested"], classes)}
    record = BlendRecord(
        name=name, method=args.method, per_class=args.per_class, members=names, classes=list(classes), folds=k,
        class_map=members.root.class_map.to_record() if members.root.class_map else None,
        weights=fit.weights.tolist(), temperatures=fit.temperatures.tolist(),
        chosen=fit.chosen, moved=fit.moved, start_miou_sample=fit.start_miou,
        candidates_sample=fit.candidates, fit_message=fit.message, n_evals=fit.n_evals,
        oof=_scores(cms["blend"], classes), nested=_scores(cms["nested"], classes),
        nested_folds=[{"fold": r.fold, "weights": r.fit.weights.tolist(),
                       "temperatures": r.fit.temperatures.tolist(), "chosen": r.fit.chosen,
                       "sample_miou_heldout": r.miou, "miou_heldout": mean_iou(cms[f"nested@fold{r.fold}"]),
                       "confusion_heldout": cms[f"nested@fold{r.fold}"].tolist()} for r in nested],
        member_scores={n: _scores(cms[n], classes) for n in names}, global_=global_,
        test=test, sample_pixels=len(sample.labels), seed=args.seed, order=args.order,
        submission=str(csv_path), written=summary.written, data_root=str(members.root.path),
        timings_s=laps.seconds, created=datetime.now(UTC).isoformat(timespec="seconds"), left_out=left_out)
    if not args.dry_run:
        _write_outputs(record, members, Path(args.out_dir), _track(record, args))
    return record


def _track(record: BlendRecord, args: argparse.Namespace) -> str:
    """Log the blend to ``--track``'s trackers; the leaderboard's ``trackers`` cell."""
    if not args.track:
        return ""
    params = {"members": ",".join(record.members), "method": method_label(record.method, record.per_class),
              "weights": str(np.round(record.weights, 4).tolist()),
              "temperatures": str([round(t, 4) for t in record.temperatures]), "chosen": record.chosen}
    summary = {"oof/miou": record.oof["miou"], "oof/pixel_acc": record.oof["pixel_acc"],
               "nested/miou": record.nested["miou"], "nested/pixel_acc": record.nested["pixel_acc"],
               **{f"nested_iou/{c}": v for c, v in record.nested["per_class_iou"].items()}}
    if record.test:
        summary.update({"test/miou": record.test["miou"], "test/pixel_acc": record.test["pixel_acc"]})
    return track_blend(record.name, args.track, args.runs_dir, args.mlflow_uri, params, summary)


def _write_outputs(record: BlendRecord, members: Members, out_dir: Path, trackers: str = "") -> None:
    name, names, classes = record.name, record.members, record.classes
    record.write(out_dir / f"{name}.json")
    plot_weights(names, record.weights, record.temperatures, out_dir / "plots" / f"{name}_weights.png",
                 f"{name}: weights and temperatures", classes)
    per_model = {n: list(record.member_scores[n]["per_class_iou"].values()) for n in names}
    plot_per_class(classes, per_model, list(record.oof["per_class_iou"].values()),
                   out_dir / "plots" / f"{name}_per_class.png", f"{name}: OOF per-class IoU")
    board = out_dir / "leaderboard.csv"
    upsert_leaderboard(leaderboard_row(
        name=name, kind="blend", members=names, weights=np.round(record.weights, 4).tolist(),
        temperatures=[round(t, 4) for t in record.temperatures], oof_miou=record.oof["miou"],
        oof_miou_nested=record.nested["miou"], pixel_acc=record.oof["pixel_acc"],
        per_class_iou=record.oof["per_class_iou"], submission=record.submission, created=record.created,
        notes="; ".join(f"left out {line}" for line in record.left_out), trackers=trackers),
        board)
    reported = sync_experiment_rows(members.runs_dir, board, names)
    for store in members.stores:
        if store.name not in reported:  # no kfold.report run yet: this blend's full-resolution score of the store
            s = record.member_scores[store.name]
            upsert_leaderboard(leaderboard_row(name=store.name, kind="experiment", members=store.name,
                                               oof_miou=s["miou"], oof_miou_nested=s["miou"], pixel_acc=s["pixel_acc"],
                                               per_class_iou=s["per_class_iou"]), board)


def format_table(record: BlendRecord) -> str:
    """The final report: members, blend in-sample and nested, local test score, weights, timings."""
    names = record.members
    blend_label = f"blend ({method_label(record.method, record.per_class)})"
    width = max(16, len(blend_label) + 1, *(len(n) + 2 for n in names))
    rows = [f"{'model':<{width}} {'OOF mIoU':>8}   {'pixel acc':>9}"]
    rows += [f"{n:<{width}} {s['miou']:>8.4f}   {s['pixel_acc']:>9.4f}" for n, s in record.member_scores.items()]
    if record.global_:  # the global blend a per-class fit started from
        g = record.global_
        w = " ".join(f"{wi:.3f}" for wi in g["weights"])
        rows.append(f"{'blend (global)':<{width}} {g['oof']['miou']:>8.4f}   {g['oof']['pixel_acc']:>9.4f}   "
                    f"in-sample, one weight per model ({w})")
        rows.append(f"{'global (nested)':<{width}} {g['nested']['miou']:>8.4f}   {g['nested']['pixel_acc']:>9.4f}"
                    f"   nested CV, {record.folds} folds")
    chosen = _chosen_label(record.chosen, names)
    rows.append(f"{blend_label:<{width}} {record.oof['miou']:>8.4f}   "
                f"{record.oof['pixel_acc']:>9.4f}   in-sample (chosen: {chosen})")
    rows.append(f"{'blend (nested)':<{width}} {record.nested['miou']:>8.4f}   {record.nested['pixel_acc']:>9.4f}"
                f"   nested CV, {record.folds} folds")
    if record.test is not None:
        t = record.test
        rows.append(f"{'test (local)':<{width}} {t['miou']:>8.4f}   {t['pixel_acc']:>9.4f}   {t['source']}")
        rows += [f"{'  ' + n + ' alone':<{width}} {s['miou']:>8.4f}   {s['pixel_acc']:>9.4f}   the same test images"
                 for n, s in t.get("members", {}).items()]
    temps = " ".join(f"{n}={t:.2f}" for n, t in zip(names, record.temperatures))
    if np.ndim(record.weights) == 2:  # per class: one line per member
        rows.append("weights per class: " + " ".join(f"{c[:5]:>5}" for c in record.classes))
        rows += [f"  {n:<{width - 2}} " + " ".join(f"{v:>5.2f}" for v in w) for n, w in zip(names, record.weights)]
        weights = "per class (above)"
    else:
        weights = " ".join(f"{n}={w:.3f}" for n, w in zip(names, record.weights))
    opt = record.candidates_sample["optimiser"]
    start = record.start_miou_sample
    if record.method == "uniform":
        moved = "n/a (uniform weights, nothing optimised)"
    elif record.moved:
        moved = f"yes (start {start:.4f} -> {opt:.4f} on the sample)"
    else:
        moved = f"NO: it ended where it started ({start:.4f} on the sample)"
    rows.append(f"weights  {weights}   temperatures {temps}   optimiser moved: {moved}")
    rows += [f"LEFT OUT (--skip-broken): {line}" for line in record.left_out]
    rows.append("timings  " + ", ".join(f"{k} {v:.1f} s" for k, v in record.timings_s.items()))
    where = Path(record.submission)
    rows.append(f"{'wrote' if record.written else 'dry run, nothing written:'} {where}, "
                f"{where.with_suffix('.json').name}, plots/{record.name}_*.png, leaderboard.csv")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_entry_point(lambda: print(format_table(run(args))), args.debug)


if __name__ == "__main__":
    sys.exit(main())
