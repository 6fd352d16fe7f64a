"""Derivative-free search on the true weighted mIoU of a blend: the evaluator, a pattern search and hillclimb.

The mIoU of ``argmax(sum_m w_m p_m)`` is piecewise constant in the weights, so these methods only compare
true-mIoU values: ``pattern_search`` polishes a start point by compass moves on the simplex, ``hillclimb`` is
greedy ensemble selection (Caruana et al. 2004). ``ensemble.optimize`` builds the fits on top of them.

All inputs are pixel samples: probabilities (P, C) per model, labels (P,), and per-pixel weights that
restore population class frequencies (``ensemble.sampling.stratified_pixel_sample``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from torch import Tensor

from kfold.argmax import class_argmax
from kfold.metrics import mean_iou
from tta.functional import log_probs, tempered_from_log

T_BOUNDS = (0.5, 2.0)


def class_weight(w: float | np.ndarray | Sequence[float], ndim: int, axis: int) -> float | Tensor:
    """One model's blend weight ready to multiply its probabilities: a float, or a float32 tensor of per-class
    weights shaped to broadcast along the class ``axis`` of an ``ndim``-dimensional array."""
    arr = np.asarray(w, dtype=np.float64)
    if arr.ndim == 0:
        return float(arr)
    shape = [1] * ndim
    shape[axis] = arr.shape[0]
    return torch.from_numpy(arr.astype(np.float32)).reshape(shape)


def accumulate_weighted(acc: Tensor | None, q: Tensor, w: float | Tensor) -> Tensor:
    """``acc + w * q`` in place (``w * q`` when ``acc`` is None); ``w`` a float or per-class (see ``class_weight``).

    The one float32 summation used by blend_probs and by the fit, so their argmaxes agree.
    """
    if isinstance(w, Tensor):
        return q * w if acc is None else acc.addcmul_(q, w)
    return q * w if acc is None else acc.add_(q, alpha=w)


def weighted_confusion(
    labels: np.ndarray | Tensor,
    pred: np.ndarray | Tensor,
    sample_weight: np.ndarray | Tensor,
    num_classes: int,
) -> np.ndarray:
    """(C, C) float64 confusion matrix (rows = target, cols = prediction) with per-pixel weights.

    Args:
        labels: (P,) int class ids in [0, C) (no ignore pixels: they are never sampled).
        pred: (P,) int predicted class ids.
        sample_weight: (P,) weights, e.g. population / sample class counts.
        num_classes: C.
    """
    # numpy's bincount is single-threaded: torch's slows down badly on a busy 2-core machine.
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(pred, dtype=np.int64)
    w = np.asarray(sample_weight, dtype=np.float64)
    cm = np.bincount(flat, weights=w, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes)


class Evaluator:
    """True weighted mIoU of blends on fixed sample pixels, with re-tempered probabilities cached.

    Same arithmetic as ``score_blend``: the same ``apply_temperature`` and float32 summation (a zero-weight
    term adds exact zeros, so skipping it changes nothing).
    """

    def __init__(
        self,
        model_probs: Sequence[np.ndarray],
        labels: np.ndarray,
        sample_weight: np.ndarray,
        num_classes: int,
    ):
        if len(model_probs) == 0:
            raise ValueError("need at least one model")
        labels = np.asarray(labels)
        n = labels.shape[0]
        for i, p in enumerate(model_probs):
            if p.shape != (n, num_classes):
                raise ValueError(f"model {i} probabilities: shape {p.shape}, expected ({n}, {num_classes})")
        if np.shape(sample_weight) != (n,) or not np.all(np.asarray(sample_weight) > 0):
            raise ValueError(f"sample_weight must be ({n},) and > 0, got shape {np.shape(sample_weight)}")
        if n == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be a non-empty (P,) array in [0, {num_classes})")
        # Held class-major (C, P): torch's softmax over a short last axis is slow on CPU, over the leading axis
        # it is not; the argmax over classes is then class_argmax's (a numba kernel, bench/bench_argmax.py).
        self.probs = [torch.from_numpy(np.ascontiguousarray(np.asarray(p, dtype=np.float32).T)) for p in model_probs]
        # A search re-tempers the same probabilities at many temperatures: one log each, not one per temperature.
        self._log_probs = [log_probs(p) for p in self.probs]
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.sample_weight = torch.from_numpy(np.asarray(sample_weight, dtype=np.float64))
        self._labels_np, self._weight_np = self.labels.numpy(), self.sample_weight.numpy()
        self.num_classes = num_classes
        self.n_models = len(model_probs)
        self.n_evals = 0
        self._cache: dict[tuple[int, float], Tensor] = {}

    def tempered(self, i: int, temperature: float) -> Tensor:
        """softmax(log p_i / T), float32 (C, P); a small cache keeps the most recent ones."""
        key = (i, float(temperature))
        if key not in self._cache:
            if len(self._cache) >= 3 * self.n_models:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = tempered_from_log(self._log_probs[i], float(temperature), dim=0)
        return self._cache[key]

    def score_pred(self, pred: Tensor) -> float:
        """Weighted mIoU of predicted class ids (P,); counts as one evaluation."""
        self.n_evals += 1
        cm = weighted_confusion(self._labels_np, pred.numpy(), self._weight_np, self.num_classes)
        return float(mean_iou(cm))

    def blend(self, weights: np.ndarray, temperatures: np.ndarray) -> Tensor:
        """sum_m w_m softmax(log p_m / T_m), float32 (C, P); weights (M,) or per class (M, C)."""
        acc = None
        for i, (w, t) in enumerate(zip(weights, temperatures)):
            if np.any(w != 0):
                acc = accumulate_weighted(acc, self.tempered(i, t), class_weight(w, 2, 0))
        return acc

    def miou(self, weights: np.ndarray, temperatures: np.ndarray) -> float:
        """Weighted true mIoU of argmax(sum_m w_m softmax(log p_m / T_m)); weights (M,) or per class (M, C)."""
        return self.score_pred(class_argmax(self.blend(weights, temperatures), 0))


class ColumnMoves:
    """True mIoU of per-class weights that differ from a base point in one class's column only.

    Such a move changes one column of the blend: its values are recomputed alone (the same float32 ops, in
    the same order, as :meth:`Evaluator.blend`, so bit-identical) and compared with the best of the other
    classes, kept from the base point. A per-class polish evaluates ~C x more moves than a global one;
    this makes each ~1/C of a full evaluation.

    Args:
        ev: the evaluator (counts the evaluations).
        weights: (M, C) base weights. temperatures: (M,) base temperatures (moves keep them).
    """

    def __init__(self, ev: Evaluator, weights: np.ndarray, temperatures: np.ndarray):
        self.ev, self.temperatures = ev, np.asarray(temperatures)
        acc = ev.blend(weights, temperatures)
        self.best_value, self.best_index = acc.amax(dim=0), class_argmax(acc, 0).long()  # first of ties, as argmax
        acc[self.best_index, torch.arange(acc.shape[1])] = -torch.inf
        self.second_value, self.second_index = acc.amax(dim=0), class_argmax(acc, 0).long()

    def miou(self, weights: np.ndarray, c: int) -> float:
        """Weighted true mIoU of ``weights``, equal to the base point outside column ``c``."""
        column = None
        for i, (w, t) in enumerate(zip(weights, self.temperatures)):
            if np.any(w != 0):
                column = accumulate_weighted(column, self.ev.tempered(i, t)[c],
                                             torch.tensor([w[c]], dtype=torch.float32))
        self.ev.n_evals += 1
        cm = _column_move_confusion(column.numpy(), c, self.best_value.numpy(), self.best_index.numpy(),
                                    self.second_value.numpy(), self.second_index.numpy(), self.ev._labels_np,
                                    self.ev._weight_np, self.ev.num_classes)
        return float(mean_iou(cm))


@numba.njit(nogil=True, cache=True)
def _column_move_confusion(column, c, best_value, best_index, second_value, second_index, labels, weights,
                           num_classes):  # pragma: no cover - compiled
    """Weighted confusion of the prediction whose class ``c`` scores ``column`` and whose other classes are as at
    the base point: one pass instead of three torch.where and a bincount (a per-class polish makes ~1000 such
    moves per fit). Pixels are added in order, as ``np.bincount`` does, so the matrix is bit-identical."""
    cm = np.zeros((num_classes, num_classes))
    for p in range(column.shape[0]):
        # The best class other than c: the base's best, or its second where the base's best was c.
        if best_index[p] == c:
            other_value, other_index = second_value[p], second_index[p]
        else:
            other_value, other_index = best_value[p], best_index[p]
        # argmax keeps the first of tied classes: c wins a tie only against a later class.
        wins = column[p] > other_value or (column[p] == other_value and other_index > c)
        cm[labels[p], c if wins else other_index] += weights[p]
    return cm


def pattern_search(
    ev: Evaluator, w: np.ndarray, log_t: np.ndarray, cur: float, fit_temperature: bool, max_evals: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Derivative-free polish on the true mIoU: best-improvement compass search on the simplex.

    Moves shift ``step`` of weight from model j to model i (staying on the simplex; with per-class weights
    (M, C), within one class's column) and, with temperatures, move one model's log T by +-step within
    ``T_BOUNDS``; steps halve when no move improves.
    """
    m = ev.n_models
    lo, hi = np.log(T_BOUNDS)
    step_w, step_t, used = 0.1, 0.2, 0
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    if w.ndim == 2:  # per-class weights: the same moves inside each class's column
        pairs = [((i, c), (j, c)) for c in range(w.shape[1]) for i, j in pairs]
    moves = [("w", i, j) for i, j in pairs]
    if fit_temperature:
        moves += [("t", i, sign) for i in range(m) for sign in (1, -1)]
    columns = None  # ColumnMoves of the current point (per-class weights), made on first use
    while used < max_evals and step_w >= 0.01:
        best = None
        for kind, i, j in moves:
            if used >= max_evals:
                break
            cw, ct = w.copy(), log_t.copy()
            if kind == "w":
                d = min(step_w, w[j])
                cw[i], cw[j] = w[i] + d, max(w[j] - d, 0.0)
            else:
                ct[i] = np.clip(log_t[i] + j * step_t, lo, hi)
                d = abs(ct[i] - log_t[i])
            if d <= 1e-12:
                continue
            if kind == "w" and w.ndim == 2:
                columns = columns or ColumnMoves(ev, w, np.exp(log_t))
                val = columns.miou(cw, i[1])
            else:
                val = ev.miou(cw, np.exp(ct))
            used += 1
            if val > cur + 1e-12 and (best is None or val > best[0]):
                best = (val, cw, ct)
        if best is None:
            step_w, step_t = step_w / 2, step_t / 2
        else:
            cur, w, log_t = best
            columns = None
    return w, log_t, cur


def hillclimb(
    ev: Evaluator, temperatures: np.ndarray, rounds: int, rng: np.random.Generator
) -> tuple[np.ndarray, int, str]:
    """Greedy ensemble selection with replacement (Caruana et al. 2004; AutoGluon's EnsembleSelection).

    Start empty; each round add the model whose addition gives the best true mIoU of the running mean
    (ties broken at random, as auto-sklearn does). Returns (counts / rounds, first pick, message).
    """
    if rounds < 1:
        raise ValueError(f"hillclimb rounds must be >= 1, got {rounds}")
    tempered = [ev.tempered(i, t) for i, t in enumerate(temperatures)]
    acc = torch.zeros_like(tempered[0])
    counts = np.zeros(ev.n_models)
    trace, picks = [], []
    for _ in range(rounds):
        # argmax of (sum + q_i) equals argmax of the mean: no division needed.
        scores = np.array([ev.score_pred(class_argmax(acc + q, 0)) for q in tempered])
        ties = np.flatnonzero(scores == scores.max())
        pick = int(ties[0] if len(ties) == 1 else rng.choice(ties))
        acc += tempered[pick]
        counts[pick] += 1
        picks.append(pick)
        trace.append(float(scores.max()))
    msg = (f"hillclimb: {rounds} rounds, counts {counts.astype(int).tolist()}, running-mean mIoU "
           f"{trace[0]:.4f} (model {picks[0]}) -> {trace[-1]:.4f}")
    return counts / rounds, picks[0], msg
