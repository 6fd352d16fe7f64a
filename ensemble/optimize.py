"""Blend weights and temperatures that really maximise OOF mIoU.

The mIoU of ``argmax(sum_m w_m p_m)`` is piecewise constant in the weights: its finite-difference gradient
is zero almost everywhere, so gradient methods on it (SLSQP with numeric derivatives) stop at their start
and report success. Here ``slsqp`` optimises a smooth surrogate (soft Jaccard of the blended probabilities)
with an analytic gradient, then polishes on the true weighted mIoU by a derivative-free pattern search;
``hillclimb`` is greedy ensemble selection (Caruana et al. 2004). Whatever the method, the chosen blend is
never worse on the sample than uniform weights or the best single model. With ``per_class=True`` each model
gets one weight per class (M x C, each class's column on the simplex), fitted from the global optimum: a
model can be trusted for the classes it segments best.
The surrogate lives in ``ensemble.surrogate``, the true-mIoU evaluator and the derivative-free searches in
``ensemble.search``, the nested-CV estimate in ``ensemble.nested``.

All inputs are pixel samples: probabilities (P, C) per model, labels (P,), and per-pixel weights that
restore population class frequencies (``ensemble.sampling.stratified_pixel_sample``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from ensemble.search import (
    T_BOUNDS,
    Evaluator,
    accumulate_weighted,
    class_weight,
    hillclimb,
    pattern_search,
    weighted_confusion,
)
from ensemble.surrogate import Surrogate
from tta.functional import apply_temperature, log_probs, tempered_from_log

METHODS = ("slsqp", "hillclimb", "uniform")


@dataclass
class BlendResult:
    """A fitted blend. ``miou`` is the weighted true mIoU on the fitting sample (in-sample, optimistic).

    ``weights`` is (M,), or (M, C) when the chosen blend has per-class weights.
    """

    weights: np.ndarray
    temperatures: np.ndarray
    miou: float
    start_miou: float
    moved: bool  # False: the optimiser ended where it started
    n_evals: int  # surrogate + true-mIoU evaluations
    seconds: float
    method: str
    chosen: str  # "optimiser" | "global" (per-class fits) | "uniform" | "best_single:<i>"
    message: str
    candidates: dict[str, float] = field(default_factory=dict)  # sample mIoU of every candidate
    candidate_params: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (weights, T)


def blend_probs(
    model_probs: Sequence[np.ndarray | Tensor],
    weights: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    temperatures: Sequence[float] | None = None,
    axis: int = -1,
    tempered: Callable[[int, float], Tensor] | None = None,
) -> np.ndarray | Tensor:
    """Weighted mean of re-tempered probabilities, float32: sum_m w_m * softmax(log p_m / T_m).

    Works on sample arrays (P, C) with ``axis=-1`` and on chunks of full images (B, C, H, W) with
    ``axis=1``; the fit does the same arithmetic, so OOF and test blends agree.

    Args:
        model_probs: one array per model, same shape, classes along ``axis`` (any float dtype).
        weights: one weight per model, or one per model and class (M, C) (used as given; fits return
            weights summing to 1, per class for per-class weights).
        temperatures: one T > 0 per model; None = all 1 (still renormalised).
        axis: class axis.
        tempered: ``(model index, T) -> softmax(log p / T)`` of ``model_probs``, e.g. a cache shared by
            several blends of the same probabilities (:class:`TemperedCache`); default: computed here.

    Returns:
        numpy float32 when every input is numpy, else a torch float32 tensor.
    """
    if len(model_probs) == 0 or len(weights) != len(model_probs):
        raise ValueError(f"need one weight per model: {len(weights)} weights for {len(model_probs)} models")
    temps = [1.0] * len(model_probs) if temperatures is None else list(temperatures)
    if len(temps) != len(model_probs):
        raise ValueError(f"need one temperature per model: {len(temps)} for {len(model_probs)} models")
    as_numpy = all(isinstance(p, np.ndarray) for p in model_probs)
    tensors = [torch.from_numpy(np.asarray(p)) if isinstance(p, np.ndarray) else p for p in model_probs]
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"model {i} probabilities have shape {tuple(t.shape)}, model 0 {tuple(shape)}")
    n_classes = shape[axis]
    for i, w in enumerate(weights):
        if not (np.ndim(w) == 0 or np.shape(w) == (n_classes,)):
            raise ValueError(f"model {i} weight must be a number or {n_classes} per-class numbers, got {w!r}")
    out = None
    for i, (p, w, temp) in enumerate(zip(tensors, weights, temps)):
        q = apply_temperature(p, float(temp), dim=axis) if tempered is None else tempered(i, float(temp))
        out = accumulate_weighted(out, q, class_weight(w, len(shape), axis))
    return out.numpy() if as_numpy else out


class TemperedCache:
    """``(model index, T) -> softmax(log p / T)`` of fixed probabilities, each log and each (model, T) computed
    once: the candidate blends of a chunk (in-sample, nested, global) share most of them. The same float32
    operations as ``apply_temperature``, so the same values.

    Args:
        model_probs: one tensor per model, classes along ``axis``.
        axis: class axis.
    """

    def __init__(self, model_probs: Sequence[Tensor], axis: int = 1):
        self.model_probs, self.axis = model_probs, axis
        self._log: dict[int, Tensor] = {}
        self._tempered: dict[tuple[int, float], Tensor] = {}

    def __call__(self, i: int, temperature: float) -> Tensor:
        key = (i, float(temperature))
        if key not in self._tempered:
            if i not in self._log:
                self._log[i] = log_probs(self.model_probs[i])
            self._tempered[key] = tempered_from_log(self._log[i], float(temperature), self.axis)
        return self._tempered[key]


def score_blend(
    model_probs: Sequence[np.ndarray],
    labels: np.ndarray,
    sample_weight: np.ndarray,
    weights: Sequence[float],
    temperatures: Sequence[float],
    num_classes: int,
) -> np.ndarray:
    """Weighted confusion matrix of a blend with given (fitted) parameters on sample pixels.

    Args:
        model_probs: (P, C) probabilities per model.
        labels: (P,) class ids.
        sample_weight: (P,) pixel weights.
        weights, temperatures: blend parameters, one per model (weights may be per class, (M, C)).
        num_classes: C.
    """
    pred = blend_probs(model_probs, weights, temperatures, axis=-1).argmax(axis=-1)
    return weighted_confusion(labels, pred, sample_weight, num_classes)


def fit_temperature_nll(probs: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray) -> float:
    """Temperature scaling of one model (Guo et al. 2017): T in ``T_BOUNDS`` minimising weighted NLL.

    Args:
        probs: (P, C) probabilities; labels: (P,) class ids; sample_weight: (P,) pixel weights.
    """
    logp = torch.from_numpy(np.asarray(probs)).double().clamp_min(1e-30).log()
    lab = torch.as_tensor(labels).long()[:, None]
    s = torch.as_tensor(sample_weight, dtype=torch.float64)

    def nll(log_t: float) -> float:
        ll = torch.log_softmax(logp / np.exp(log_t), dim=1).gather(1, lab)[:, 0]
        return float(-(s * ll).sum() / s.sum())

    res = scipy.optimize.minimize_scalar(nll, bounds=np.log(T_BOUNDS), method="bounded")
    return float(np.exp(res.x))


def _fit_slsqp(
    ev: Evaluator,
    w0: np.ndarray,
    log_t0: np.ndarray,
    fit_temperature: bool,
    max_polish_evals: int,
    sharpness: Sequence[float],
    surrogate_pixels: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, str]:
    """SLSQP on the surrogate from (w0, log_t0), then a pattern search on the true mIoU from the better of
    the surrogate optimum and the start. ``w0`` is (M,), or (M, C) to fit per-class weights."""
    m = ev.n_models
    k = 1 if w0.ndim == 1 else w0.shape[1]
    nw = m * k
    x0 = np.concatenate([w0.ravel(), log_t0 if fit_temperature else []])
    bounds = [(0.0, 1.0)] * nw + [tuple(np.log(T_BOUNDS))] * (m if fit_temperature else 0)
    # Weights on the simplex, per class column when per-class (x holds them row-major: model i, class c at
    # i*k + c). Temperatures are free within bounds: thanks to the sharpening the surrogate does not drift
    # them all to the lower bound (tried: pinning sum log T = 0 scored lower on synthetic blends).
    column_sums = np.zeros((k, len(x0)))
    for i in range(m):
        column_sums[np.arange(k), i * k + np.arange(k)] = 1.0
    cons = [{"type": "eq", "fun": lambda x: column_sums @ x - 1.0, "jac": lambda x: column_sums}]
    # float64 autograd costs far more than a true-mIoU evaluation per pixel: the surrogate only needs to find the
    # basin, so it sees a uniform subsample (weights stay unbiased); the polish uses every sample pixel.
    n = len(ev.labels)
    sub = torch.from_numpy(np.sort(rng.choice(n, surrogate_pixels, replace=False))) if n > surrogate_pixels else None
    pick = (lambda t: t) if sub is None else (lambda t: t[..., sub])
    sur = Surrogate([pick(p) for p in ev.probs], pick(ev.labels), pick(ev.sample_weight), fit_temperature,
                    per_class=k > 1)  # ev.probs are class-major (C, P), as the surrogate takes them
    x, parts = x0, []
    for tau in sharpness:  # continuation: a smoother surface first, then one closer to the argmax
        sur.sharpness = tau
        res = scipy.optimize.minimize(
            sur, x, jac=True, method="SLSQP", bounds=bounds, constraints=cons,
            options={"maxiter": 100, "ftol": 1e-10},
        )
        x = np.clip(res.x, [b[0] for b in bounds], [b[1] for b in bounds])
        parts.append(f"tau={tau}: {res.message} (nit={res.nit})")
    w = x[:nw].reshape(m, k) / x[:nw].reshape(m, k).sum(axis=0)
    w = w[:, 0] if w0.ndim == 1 else w
    log_t = x[nw:] if fit_temperature else np.zeros(m)
    sur_miou, start_miou = ev.miou(w, np.exp(log_t)), ev.miou(w0, np.exp(log_t0))
    if start_miou > sur_miou:
        w, log_t = w0, log_t0
    before = ev.n_evals
    w, log_t, pol_miou = pattern_search(ev, w, log_t, max(sur_miou, start_miou), fit_temperature,
                                        max_polish_evals)
    msg = (
        f"SLSQP on sharpened soft Jaccard{' (per-class weights)' if k > 1 else ''} [{'; '.join(parts)}; "
        f"{sur.n_evals} evals]: true mIoU {start_miou:.4f} (start) -> {sur_miou:.4f}; pattern search: -> "
        f"{pol_miou:.4f} in {ev.n_evals - before} evals"
    )
    ev.n_evals += sur.n_evals
    return w, np.exp(log_t), msg


@dataclass(frozen=True)
class BlendOptions:
    """How :func:`fit_blend` fits.

    Args:
        method: "slsqp" (surrogate + polish), "hillclimb" (greedy selection) or "uniform".
        fit_temperature: fit one temperature per model (slsqp: jointly; hillclimb: NLL temperature scaling).
        per_class: slsqp only: after the global fit, fit (M, C) per-class weights starting from it; the
            global blend stays a candidate ("global") and wins unless per-class weights score strictly higher.
        seed: hillclimb tie-breaking and the slsqp surrogate subsample.
        rounds: hillclimb rounds (weights are counts / rounds).
        max_polish_evals: true-mIoU evaluation budget of the slsqp polish (x C for per-class weights).
        sharpness: slsqp surrogate sharpness schedule (see ``soft_jaccard``), one SLSQP run per value;
            the per-class stage runs only the last one.
        surrogate_pixels: at most this many sample pixels (a uniform subsample) feed the slsqp surrogate.
        num_threads: torch intra-op threads during the fit (restored after); None keeps the current setting.
    """

    method: str = "slsqp"
    fit_temperature: bool = True
    per_class: bool = False
    seed: int = 0
    rounds: int = 25
    max_polish_evals: int = 100
    sharpness: tuple[float, ...] = (0.3, 0.1)
    surrogate_pixels: int = 50_000
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        if self.per_class and self.method != "slsqp":
            raise ValueError(f"per-class weights are fitted by method 'slsqp', not {self.method!r}")


class MethodFit(NamedTuple):
    """What one method found: its weights and temperatures, where it started, and extra candidates."""

    weights: np.ndarray
    temperatures: np.ndarray
    start_miou: float
    moved: bool
    message: str
    extra: dict[str, tuple[np.ndarray, np.ndarray]]


def _fit_uniform(ev: Evaluator, model_probs, labels, sample_weight, opts: BlendOptions) -> MethodFit:
    m = ev.n_models
    w = np.full(m, 1.0 / m)
    return MethodFit(w, np.ones(m), ev.miou(w, np.ones(m)), False, f"uniform weights, T=1 ({m} models)", {})


def _fit_hillclimb(ev: Evaluator, model_probs, labels, sample_weight, opts: BlendOptions) -> MethodFit:
    m = ev.n_models
    temps = np.ones(m)
    if opts.fit_temperature:
        temps = np.array([fit_temperature_nll(p, labels, sample_weight) for p in model_probs])
    weights, first, msg = hillclimb(ev, temps, opts.rounds, np.random.default_rng(opts.seed))
    return MethodFit(weights, temps, ev.miou(np.eye(m)[first], np.ones(m)), not np.allclose(weights, np.eye(m)[first]),
                     msg, {})


def _fit_slsqp_method(ev: Evaluator, model_probs, labels, sample_weight, opts: BlendOptions) -> MethodFit:
    m, num_classes = ev.n_models, ev.num_classes
    uniform_w = np.full(m, 1.0 / m)
    rng = np.random.default_rng(opts.seed)
    weights, temps, msg = _fit_slsqp(ev, uniform_w, np.zeros(m), opts.fit_temperature, opts.max_polish_evals,
                                     opts.sharpness, opts.surrogate_pixels, rng)
    extra = {}
    if opts.per_class:
        extra["global"] = (weights, temps)
        # From the global optimum one SLSQP run at the final sharpness does as well as the whole
        # continuation, at a fraction of its cost (tried on the demo blend).
        w0 = np.repeat(weights[:, None], num_classes, axis=1)
        weights, temps, msg_c = _fit_slsqp(ev, w0, np.log(temps), opts.fit_temperature,
                                           opts.max_polish_evals * num_classes, opts.sharpness[-1:],
                                           opts.surrogate_pixels, rng)
        msg += f"; then {msg_c}"
    moved = not (np.allclose(weights, 1.0 / m, rtol=0, atol=1e-9) and np.allclose(temps, 1, atol=1e-9))
    return MethodFit(weights, temps, ev.miou(uniform_w, np.ones(m)), moved, msg, extra)


FITTERS = {"uniform": _fit_uniform, "hillclimb": _fit_hillclimb, "slsqp": _fit_slsqp_method}


def fit_blend(model_probs: Sequence[np.ndarray], labels: np.ndarray, sample_weight: np.ndarray, num_classes: int,
              options: BlendOptions | None = None) -> BlendResult:
    """Fit blend weights (and temperatures) on sample pixels, never ending below uniform / best single.

    Args:
        model_probs: one (P, C) float32 probability array per model.
        labels: (P,) int64 class ids in [0, C).
        sample_weight: (P,) positive pixel weights (population / sample class counts; ones if unweighted).
        num_classes: C.
        options: the method and its settings (default: global SLSQP with temperatures).
    """
    opts = options or BlendOptions()
    t0 = time.perf_counter()
    with _torch_threads(opts.num_threads):
        ev = Evaluator(model_probs, labels, sample_weight, num_classes)
        m, ones = ev.n_models, np.ones(ev.n_models)
        singles = [ev.miou(np.eye(m)[i], ones) for i in range(m)]
        best = int(np.argmax(singles))
        params = {"uniform": (np.full(m, 1.0 / m), ones), f"best_single:{best}": (np.eye(m)[best], ones)}
        fitter = _fit_uniform if m == 1 else FITTERS[opts.method]
        found = fitter(ev, model_probs, labels, sample_weight, opts)
        params.update(found.extra)
        params["optimiser"] = (found.weights, found.temperatures)
        candidates = {name: ev.miou(w, t) for name, (w, t) in params.items()}
    # Strictly better or it loses: on ties the simpler blend wins (uniform, a single model, global weights,
    # then the optimiser's own result).
    chosen = "uniform"
    for name in (f"best_single:{best}", "global", "optimiser"):
        if name in candidates and candidates[name] > candidates[chosen]:
            chosen = name
    msg = found.message + ("" if found.moved else "; the optimiser did NOT move from its start point")
    w_out, t_out = params[chosen]
    return BlendResult(
        weights=np.asarray(w_out, dtype=np.float64), temperatures=np.asarray(t_out, dtype=np.float64),
        miou=float(candidates[chosen]), start_miou=float(found.start_miou),
        moved=bool(found.moved), n_evals=ev.n_evals, seconds=time.perf_counter() - t0, method=opts.method,
        chosen=chosen, message=msg + f"; chosen {chosen}", candidates={k: float(v) for k, v in candidates.items()},
        candidate_params={k: (np.asarray(w, dtype=np.float64), np.asarray(t, dtype=np.float64))
                          for k, (w, t) in params.items()},
    )


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    # Each op here touches little memory: threads gain little, and on a busy machine OpenMP barriers waiting
    # for descheduled threads make a fit many times slower than on one thread.
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
