"""Is B really better than A, or is that fold noise? A paired comparison over the folds of one ``folds.csv``.

Usage:
    python -m ensemble.compare exp093_2 exp093_5            # experiments, blends (by name) or trials (study/t007)
    python -m ensemble.compare exp093_2 exp093_5 my_blend --alpha 0.05

Each item's score on each fold is its OOF mIoU on that fold's images at full label resolution: an experiment's
own store, a blend's nested-CV held-out fold (weights fitted without that fold). The folds pair the items, so
the comparison tests the per-fold differences against the first item: their mean and spread, the paired t
test, the Wilcoxon signed-rank test (scipy) and the paired t test corrected for overlapping training sets
(Nadeau & Bengio 2003): fold scores share most of their training images, so the plain t test takes their
spread as smaller than it is. The verdict follows the corrected test (Holm-adjusted over the comparisons).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from ensemble.record import read_blend_record
from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.figures import save_figure
from kfold.data.layout import DataRoot
from kfold.metrics import mean_iou
from kfold.store.format import StoreError, fold_dirs
from kfold.store.read import ExperimentStore, open_experiment, resolve_root, score_experiment
from kfold.store.scores import cached_confusion, keep_confusion


@dataclass
class Scored:
    """One compared item: per-fold OOF mIoU, pooled per-class IoU, local test mIoU (None without test labels)."""

    name: str
    kind: str  # experiment | blend
    folds_sha256: str
    fold_miou: np.ndarray  # (k,)
    per_class_iou: dict[str, float]
    test_miou: float | None = None
    val_share: float = 0.25  # mean over folds of n_validation / n_train (the corrected t test's ratio)
    classes: list[str] = field(default_factory=list)


def score_item(name: str, runs_dir: Path, out_dir: Path, data_root: Path | None) -> Scored:
    """Score an experiment (a folder under ``runs_dir``) or a blend (``out_dir/<name>.json``)."""
    if fold_dirs(runs_dir / name):
        return _score_experiment(name, runs_dir, data_root)
    record_path = out_dir / f"{name}.json"
    if record_path.is_file():
        return _score_blend(name, record_path, runs_dir)
    raise FileNotFoundError(f"{name}: neither an experiment in {runs_dir}/ nor a blend record {record_path}")


def _val_share(fold_of: dict[str, int], k: int) -> float:
    sizes = np.bincount(list(fold_of.values()), minlength=k)
    return float(np.mean(sizes / (sizes.sum() - sizes)))


def _score_experiment(name: str, runs_dir: Path, data_root: Path | None) -> Scored:
    store = open_experiment(runs_dir, name)
    root = resolve_root(data_root, store)
    score = score_experiment(store, root)
    keep_confusion(store, root, "oof", score["confusion_matrix"])
    return Scored(name, "experiment", store.folds_sha256,
                  np.array([mean_iou(cm) for cm in score["fold_confusions"]]), score["per_class_iou"],
                  _test_miou(store, root), _val_share(store.fold_of, store.folds), list(store.classes))


def _test_miou(store: ExperimentStore, root: DataRoot) -> float | None:
    """The fold-averaged test prediction's mIoU: kept beside the store by the report, else scored here."""
    if not root.has_test_labels:
        return None
    cm = cached_confusion(store, root, "test")
    if cm is None:
        from kfold.report import test_confusion

        cm = test_confusion(store, root)
    return mean_iou(cm)


def _score_blend(name: str, path: Path, runs_dir: Path) -> Scored:
    record = read_blend_record(path)
    folds = sorted(record.nested_folds, key=lambda f: f.get("fold", -1))
    if not folds or any("confusion_heldout" not in f for f in folds):
        raise ValueError(f"{path}: no per-fold held-out scores (a blend written before they were recorded); "
                         f"run the blend again")
    store = open_experiment(runs_dir, record.members[0])  # the blend's folds are its members'
    fold_miou = np.array([mean_iou(np.asarray(f["confusion_heldout"])) for f in folds])
    test = record.test["miou"] if record.test else None
    per_class = {c: math.nan if v is None else float(v) for c, v in record.nested["per_class_iou"].items()}
    return Scored(name, "blend", store.folds_sha256, fold_miou, per_class, test,
                  _val_share(store.fold_of, store.folds), list(record.classes))


@dataclass
class Paired:
    """The per-fold differences of B against A and the tests on them."""

    diff: np.ndarray
    p_t: float
    p_wilcoxon: float
    p_corrected: float
    p_holm: float = math.nan


def paired_tests(a: Scored, b: Scored) -> Paired:
    """Paired t, Wilcoxon signed-rank and the Nadeau-Bengio corrected paired t on ``b - a`` over the folds."""
    diff = b.fold_miou - a.fold_miou
    k = len(diff)
    if np.allclose(diff, 0):
        return Paired(diff, 1.0, 1.0, 1.0)
    p_t = float(stats.ttest_rel(b.fold_miou, a.fold_miou).pvalue)
    p_w = float(stats.wilcoxon(diff).pvalue)
    sd = diff.std(ddof=1)
    if sd == 0:  # every fold moved by the same amount: no spread to test against
        p_c = 0.0
    else:
        t = diff.mean() / math.sqrt((1 / k + a.val_share) * sd**2)
        p_c = float(2 * stats.t.sf(abs(t), k - 1))
    return Paired(diff, 1.0 if math.isnan(p_t) else p_t, p_w, p_c)


def holm(pairs: Sequence[Paired]) -> None:
    """Holm's step-down adjustment of the corrected p-values, in place (one comparison: unchanged)."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].p_corrected)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pairs) - rank) * pairs[i].p_corrected))
        pairs[i].p_holm = running


def smallest_wilcoxon_p(k: int) -> float:
    """The smallest two-sided p-value an exact Wilcoxon test can give on ``k`` pairs (2 / 2^k)."""
    return min(1.0, 2.0 / 2**k)


def verdict(a: Scored, b: Scored, pair: Paired, alpha: float, comparisons: int) -> str:
    k, mean = len(pair.diff), pair.diff.mean()
    adjusted = f", Holm-adjusted over {comparisons} comparisons" if comparisons > 1 else ""
    if pair.p_holm < alpha:
        better, worse = (b, a) if mean > 0 else (a, b)
        return (f"verdict: {better.name} is better than {worse.name} by {abs(mean):.4f} mIoU on average "
                f"(corrected paired t p={pair.p_holm:.3g} < {alpha}{adjusted})")
    return (f"verdict: {k} folds cannot tell {b.name} from {a.name} (corrected paired t p={pair.p_holm:.3g} >= "
            f"{alpha}{adjusted}); a difference of {mean:+.4f} is within fold noise")


def format_comparison(items: Sequence[Scored], pairs: Sequence[Paired], alpha: float) -> str:
    base, k = items[0], len(items[0].fold_miou)
    width = max(10, *(len(i.name) + 2 for i in items))
    head = f"{'fold':<6}" + "".join(f"{i.name:>{width}}" for i in items)
    head += "".join(f"{'diff ' + str(n + 1):>{12}}" for n in range(len(pairs)))
    lines = [f"paired over {k} folds of one folds.csv (sha256 {base.folds_sha256[:12]}...); each fold: OOF mIoU at "
             f"full label resolution ({', '.join(f'{i.name}: {i.kind}' for i in items)})", "", head]
    for f in range(k):
        lines.append(f"{f:<6}" + "".join(f"{i.fold_miou[f]:>{width}.4f}" for i in items)
                     + "".join(f"{p.diff[f]:>+12.4f}" for p in pairs))
    lines.append(f"{'mean':<6}" + "".join(f"{i.fold_miou.mean():>{width}.4f}" for i in items)
                 + "".join(f"{p.diff.mean():>+12.4f}" for p in pairs))
    if all(i.test_miou is not None for i in items):
        lines.append(f"{'test':<6}" + "".join(f"{i.test_miou:>{width}.4f}" for i in items)
                     + "".join(f"{b.test_miou - base.test_miou:>+12.4f}" for b in items[1:])
                     + "   local test labels (fold-averaged prediction; a blend: its submission)")
    for n, (b, p) in enumerate(zip(items[1:], pairs), start=1):
        wins = int((p.diff > 0).sum())
        lines += ["", f"diff {n}: {b.name} - {base.name}: mean {p.diff.mean():+.4f}, sd {p.diff.std(ddof=1):.4f} "
                      f"over {k} folds, better on {wins} of {k}",
                  f"  paired t p={p.p_t:.3g}   Wilcoxon signed-rank p={p.p_wilcoxon:.3g} (with {k} folds it cannot "
                  f"go below {smallest_wilcoxon_p(k):.3g})   corrected paired t p={p.p_corrected:.3g}",
                  "  " + verdict(base, b, p, alpha, len(pairs))]
    lines += ["", f"{'class':<14}" + "".join(f"{i.name:>{width}}" for i in items)
              + "".join(f"{'diff ' + str(n + 1):>{12}}" for n in range(len(pairs)))
              + "   (pooled OOF IoU; a blend: nested; n/a: the class is absent)"]
    for c in base.classes:
        values = [i.per_class_iou.get(c, math.nan) for i in items]
        cells = [f"{v:>{width}.4f}" if not math.isnan(v) else f"{'n/a':>{width}}" for v in values]
        diffs = [f"{v - values[0]:>+12.4f}" if not math.isnan(v - values[0]) else f"{'n/a':>12}" for v in values[1:]]
        lines.append(f"{c:<14}" + "".join(cells) + "".join(diffs))
    return "\n".join(lines)


def plot_comparison(items: Sequence[Scored], path: Path) -> None:
    """Per-fold mIoU lines (one per item) and per-class IoU differences against the first item."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = items[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    for item in items:
        left.plot(range(len(item.fold_miou)), item.fold_miou, marker="o", label=item.name)
    left.set_xticks(range(len(base.fold_miou)))
    left.set_xlabel("fold")
    left.set_ylabel("OOF mIoU")
    left.set_title("per fold (paired)")
    left.legend(fontsize=8)
    x = np.arange(len(base.classes))
    width = 0.8 / max(1, len(items) - 1)
    for n, item in enumerate(items[1:]):
        diffs = [item.per_class_iou.get(c, math.nan) - base.per_class_iou.get(c, math.nan) for c in base.classes]
        right.bar(x + n * width, np.nan_to_num(diffs), width, label=f"{item.name} - {base.name}")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(x + width * (len(items) - 2) / 2, base.classes, rotation=60, ha="right")
    right.set_ylabel("IoU difference")
    right.set_title("per class (pooled OOF)")
    right.legend(fontsize=8)
    save_figure(fig, path)


def compare(names: Sequence[str], runs_dir: Path, out_dir: Path, data_root: Path | None, alpha: float,
            plot: Path | None) -> str:
    """Score, test and report ``names`` against the first; the report text."""
    items = [score_item(n, runs_dir, out_dir, data_root) for n in names]
    for item in items[1:]:
        if item.folds_sha256 != items[0].folds_sha256:
            raise StoreError(f"{item.name} and {items[0].name} were trained on different folds.csv (sha256 "
                             f"{item.folds_sha256[:12]}... vs {items[0].folds_sha256[:12]}...); a paired "
                             f"comparison needs the same folds")
        if item.classes != items[0].classes:
            raise StoreError(f"{item.name} and {items[0].name} have different classes")
    pairs = [paired_tests(items[0], b) for b in items[1:]]
    holm(pairs)
    text = format_comparison(items, pairs, alpha)
    if plot is not None:
        plot_comparison(items, plot)
        text += f"\n\nplot: {plot}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m ensemble.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", metavar="NAME", help="experiments, blends or search trials; the first is the "
                                                            "baseline the others are tested against")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--out-dir", type=Path, default=Path("submissions"), help="where blend records are")
    p.add_argument("--data-root", type=Path, default=None, help="default: the root the stores recorded")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdict")
    p.add_argument("--plot", type=Path, default=None,
                   help="the figure (default <out-dir>/plots/compare_<first>_vs_<second>[...].png)")
    args = p.parse_args(argv)
    if len(args.names) < 2:
        p.error("give at least two names to compare")
    if len(set(args.names)) != len(args.names):
        p.error(f"a name is given twice: {' '.join(args.names)}")
    if not 0 < args.alpha < 1:
        p.error(f"--alpha {args.alpha}: must be in (0, 1)")
    plot = args.plot or args.out_dir / "plots" / f"compare_{'_vs_'.join(n.replace('/', '-') for n in args.names)}.png"
    return run_entry_point(lambda: print(compare(args.names, args.runs_dir, args.out_dir, args.data_root,
                                                  args.alpha, plot)), args.debug)


if __name__ == "__main__":
    sys.exit(main())
