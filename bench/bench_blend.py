"""Blend optimisation: ours against SLSQP with finite differences and Nelder-Mead on the full-resolution mIoU.

Both sides optimise the same on-disk OOF stores (three fake experiments in the ``kfold.store.write`` format,
complementary per class, with different confidences so that uniform weights are not the optimum):

* ours: ``ensemble.stores.open_members`` + ``build_sample`` (class-stratified pixel sample) +
  ``ensemble.optimize.fit_blend`` (slsqp on a smooth surrogate, then a pattern search on the true mIoU),
  timed from opening the stores to the fitted weights;
* the reference approach: ``scipy.optimize.minimize(method="SLSQP")`` without a gradient (finite
  differences) on the mIoU of ``argmax(sum_m w_m p_m)`` over every full-resolution pixel (numpy), and
  Nelder-Mead on the same objective; the full arrays are loaded first and that load is NOT timed;
* a fine grid search of the weights on the same full-resolution objective (the optimum to reach).

Every final blend is scored the same way, by ``ensemble.passes.score_full_res`` (full label resolution).
Weights only (temperatures fixed at 1) so that every method searches the same space; extra lines show
ours with temperatures fitted too, and per-class weights (``--per-class``) against one weight per model.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.optimize
import torch.nn.functional as F
from common import complementary_models, fmt_s, make_root, note, parse_args, pick, result, write_fake_experiment

from ensemble.optimize import BlendOptions, fit_blend
from ensemble.passes import score_full_res
from ensemble.stores import Members, build_sample, open_members
from kfold.metrics import mean_iou

C = 13


class FullResMiou:
    """The reference objective: mIoU of ``argmax(sum_m w_m p_m)`` over every full-resolution pixel (numpy).

    Args:
        probs: per model float32 (N, H, W, C) probabilities, already upsampled to the label size (classes
            last: numpy's argmax over a contiguous last axis is ~1.5x faster than over axis 1 of NCHW).
        labels: (N, H, W) uint8 labels (255 = ignore).
    """

    def __init__(self, probs: Sequence[np.ndarray], labels: np.ndarray):
        self.probs = list(probs)
        valid = labels != 255
        self.valid = valid
        self.base = labels[valid].astype(np.int64) * C
        self.n_evals = 0

    def __call__(self, weights: Sequence[float]) -> float:
        self.n_evals += 1
        acc = self.probs[0] * np.float32(weights[0])
        for p, w in zip(self.probs[1:], weights[1:]):
            acc += p * np.float32(w)
        pred = acc.argmax(axis=-1)[self.valid]
        cm = np.bincount(self.base + pred, minlength=C * C).reshape(C, C)
        return float(mean_iou(cm))


def load_full(members: Members, chunk: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Every member's OOF probabilities bilinearly upsampled to the label size (N, H, W, C), and the labels."""
    size = members.image_size
    probs: list[list[np.ndarray]] = [[] for _ in members.stores]
    labels = []
    for ids, chunk_probs in members.iter_oof(chunk):
        labels.append(members.labels(ids))
        for m, p in enumerate(chunk_probs):
            full = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
            probs[m].append(full.permute(0, 2, 3, 1).contiguous().numpy())
    return [np.concatenate(p) for p in probs], np.concatenate(labels)


def simplex_grid(n_models: int, step: float) -> np.ndarray:
    """Every weight vector on the simplex whose entries are multiples of ``step``."""
    n = round(1 / step)
    points = [c for c in itertools.product(range(n + 1), repeat=n_models - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in points], dtype=np.float64) / n


def slsqp_fd(objective: FullResMiou, n_models: int) -> tuple[np.ndarray, int, str]:
    """The reference approach: SLSQP on the simplex, gradient by finite differences (scipy's default)."""
    cons = [{"type": "eq", "fun": lambda x: x.sum() - 1.0}]
    res = scipy.optimize.minimize(lambda x: -objective(x), np.full(n_models, 1.0 / n_models), method="SLSQP",
                                  bounds=[(0.0, 1.0)] * n_models, constraints=cons)
    w = np.clip(res.x, 0, None)
    return w / w.sum(), int(res.nfev), f"{res.message} (nit={res.nit})"


def nelder_mead(objective: FullResMiou, n_models: int, max_evals: int) -> tuple[np.ndarray, int, str]:
    """Nelder-Mead on unconstrained x with weights |x| / sum |x| (scipy's default tolerances)."""

    def weights(x: np.ndarray) -> np.ndarray:
        a = np.abs(x)
        return a / a.sum() if a.sum() > 0 else np.full(n_models, 1.0 / n_models)

    res = scipy.optimize.minimize(lambda x: -objective(weights(x)), np.full(n_models, 1.0 / n_models),
                                  method="Nelder-Mead", options={"maxfev": max_evals})
    return weights(res.x), int(res.nfev), str(res.message)


def run_case(runs: Path, n_models: int, cfg: dict) -> None:
    names = [f"model{m}" for m in range(n_models)]
    tag = f"{n_models} models"
    # Ours, end to end from the stores: open, sample, fit.
    t0 = time.perf_counter()
    members, _ = open_members(runs, names)
    sample = build_sample(members, cfg["pixels"], seed=0, chunk=32)
    t_sample = time.perf_counter() - t0
    fit = fit_blend(sample.probs, sample.labels, sample.weights, C, BlendOptions("slsqp", fit_temperature=False))
    t_ours = time.perf_counter() - t0
    fit_t = fit_blend(sample.probs, sample.labels, sample.weights, C, BlendOptions("slsqp", fit_temperature=True))
    fit_pc = fit_blend(sample.probs, sample.labels, sample.weights, C,
                       BlendOptions("slsqp", fit_temperature=False, per_class=True))

    t0 = time.perf_counter()
    probs, labels = load_full(members, 32)
    t_load = time.perf_counter() - t0
    objective = FullResMiou(probs, labels)

    t0 = time.perf_counter()
    w_slsqp, n_slsqp, msg_slsqp = slsqp_fd(objective, n_models)
    t_slsqp = time.perf_counter() - t0
    t0 = time.perf_counter()
    w_nm, n_nm, msg_nm = nelder_mead(objective, n_models, cfg["nm_evals"])
    t_nm = time.perf_counter() - t0
    step = cfg["grid"][n_models]
    grid = simplex_grid(n_models, step)
    t0 = time.perf_counter()
    grid_scores = np.array([objective(w) for w in grid])
    t_grid = time.perf_counter() - t0
    w_grid = grid[int(np.argmax(grid_scores))]

    ones = np.ones(n_models)
    blends = {"ours": (fit.weights, ones), "ours_T": (fit_t.weights, fit_t.temperatures),
              "ours_per_class": (fit_pc.weights, ones),
              "slsqp_fd": (w_slsqp, ones), "nelder_mead": (w_nm, ones), "grid": (w_grid, ones),
              "uniform": (np.full(n_models, 1.0 / n_models), ones)}
    cms = score_full_res(members, {k: dict.fromkeys(range(members.folds), v) for k, v in blends.items()}, chunk=32)
    miou = {k: mean_iou(cm) for k, cm in cms.items()}

    pixels = f"{labels.size / 1e6:.2f}M full-res px"
    note(f"{tag}: {len(members.ids)} images {members.image_size} (stores {members.grid}), {pixels}; "
         f"sample {len(sample.labels)} px in {t_sample:.2f} s; full arrays loaded in {t_load:.2f} s (not timed)")
    result("blend", f"{tag}: wall vs Nelder-Mead", fmt_s(t_ours), "nelder-mead", fmt_s(t_nm), t_nm / t_ours,
           nm_evals=n_nm, nm=f"'{msg_nm}'")
    result("blend", f"{tag}: wall vs SLSQP-FD", fmt_s(t_ours), "slsqp-fd", fmt_s(t_slsqp), t_slsqp / t_ours,
           fd_evals=n_slsqp, moved=not np.allclose(w_slsqp, 1.0 / n_models, atol=1e-6))
    ours_rate, nm_rate = fit.n_evals / fit.seconds, n_nm / t_nm
    result("blend", f"{tag}: objective evals/s", f"{ours_rate:.0f}/s", "nelder-mead", f"{nm_rate:.1f}/s",
           ours_rate / nm_rate, ours_evals=fit.n_evals, fit_s=f"{fit.seconds:.2f}")
    diff = miou["ours"] - miou["grid"]
    result("blend", f"{tag}: OOF mIoU vs grid {step}", f"{miou['ours']:.4f}", "grid", f"{miou['grid']:.4f}",
           diff=f"{diff:+.4f}", within_0_002=diff >= -0.002, grid_points=len(grid), grid_s=f"{t_grid:.1f}")
    result("blend", f"{tag}: OOF mIoU others", f"{miou['ours']:.4f}", "nelder-mead", f"{miou['nelder_mead']:.4f}",
           slsqp_fd=f"{miou['slsqp_fd']:.4f}", uniform=f"{miou['uniform']:.4f}",
           ours_with_T=f"{miou['ours_T']:.4f}")
    result("blend", f"{tag}: per-class vs global weights", f"{miou['ours_per_class']:.4f}", "global",
           f"{miou['ours']:.4f}", diff=f"{miou['ours_per_class'] - miou['ours']:+.4f}", chosen=fit_pc.chosen,
           fit_s=f"{fit_pc.seconds:.2f}", global_fit_s=f"{fit.seconds:.2f}")
    note(f"{tag}: weights ours {np.round(fit.weights, 3).tolist()} ({fit.chosen}), grid {np.round(w_grid, 3).tolist()},"
         f" nelder-mead {np.round(w_nm, 3).tolist()}, slsqp-fd {np.round(w_slsqp, 3).tolist()} ({msg_slsqp})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    n_images, size = pick(args.mode, (300, (96, 128)), (48, (96, 128)), (20, (32, 48)))
    cfg = {
        "pixels": pick(args.mode, 300_000, 300_000, 20_000),  # ensemble/blend.py's default --pixels
        "nm_evals": pick(args.mode, 1000, 400, 12),
        "grid": pick(args.mode, {2: 0.01, 3: 0.05}, {2: 0.01, 3: 0.05}, {2: 0.25, 3: 0.5}),
    }
    with tempfile.TemporaryDirectory(prefix="bench_blend_") as tmp:
        root = make_root(Path(tmp) / "root", n_images, size)
        runs = Path(tmp) / "runs"
        for m, (skill, confidence) in enumerate(complementary_models(3, C)):
            write_fake_experiment(runs, f"model{m}", root, skill, confidence, seed=m + 1)
        for n_models in (2, 3):
            run_case(runs, n_models, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
