"""Blend optimisation core: pixel sampling, blending, the optimisers and the nested-CV estimate."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from ensemble.nested import fit_pool, nested_cv
from ensemble.optimize import (
    BlendOptions,
    blend_probs,
    fit_blend,
    fit_temperature_nll,
    score_blend,
    weighted_confusion,
)
from ensemble.sampling import gather_pixels, pixel_image_index, stratified_pixel_sample
from ensemble.surrogate import Surrogate
from kfold.metrics import confusion_matrix, mean_iou

C = 13


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _model(rng, y, good, scale=1.0, strong=3.0, weak=0.5):
    """Noisy one-hot logits: a large margin on the `good` classes, a small one elsewhere; `scale` > 1 makes
    the model overconfident (its wrong answers get near-certain probabilities too)."""
    margin = np.where(np.isin(np.arange(C), good), strong, weak)
    logits = rng.normal(0.0, 1.0, (len(y), C))
    logits[np.arange(len(y)), y] += margin[y]
    return _softmax(logits * scale)


@pytest.fixture(scope="module")
def two_models():
    """A: good on classes 0-5; B: good on 6-12 but overconfident, so equal weights let B dominate."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 8000)
    probs = [_model(rng, y, range(6)), _model(rng, y, range(6, 13), scale=4.0)]
    return probs, y, np.ones(len(y))


def _miou(probs, y, w, weights, temps=None):
    temps = np.ones(len(probs)) if temps is None else temps
    return mean_iou(score_blend(probs, y, w, weights, temps, C))


def test_stratified_sample_is_capped_deterministic_and_reweighted():
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 2, 255], size=(3, 20, 30), p=[0.7, 0.2, 0.02, 0.08]).astype(np.uint8)
    idx, w = stratified_pixel_sample(labels, 3, n_pixels=300, seed=5)
    idx2, w2 = stratified_pixel_sample(labels, 3, n_pixels=300, seed=5)
    idx3, _ = stratified_pixel_sample(labels, 3, n_pixels=300, seed=6)
    assert np.array_equal(idx, idx2) and np.array_equal(w, w2) and not np.array_equal(idx, idx3)
    assert np.all(np.diff(idx) > 0)  # sorted, unique
    flat = labels.ravel()
    sampled = flat[idx]
    assert not np.any(sampled == 255)
    pop = np.bincount(flat[flat != 255], minlength=3)
    got = np.bincount(sampled, minlength=3)
    assert got.tolist() == [100, 100, pop[2]]  # the rare class keeps all its pixels
    # weights restore population class counts exactly
    assert np.allclose(np.bincount(sampled, weights=w, minlength=3), pop)
    with pytest.raises(ValueError, match="label value 7"):
        stratified_pixel_sample(np.full((1, 2, 2), 7, np.uint8), 3, 30, 0)


def test_weighted_sample_confusion_estimates_population():
    rng = np.random.default_rng(2)
    labels = rng.choice(4, size=(20, 40, 50), p=[0.85, 0.1, 0.04, 0.01]).astype(np.uint8)
    pred = np.where(rng.random(labels.shape) < 0.7, labels, rng.integers(0, 4, labels.shape)).astype(np.uint8)
    full = confusion_matrix(labels, pred, 4)
    idx, w = stratified_pixel_sample(labels, 4, n_pixels=8000, seed=0)
    est = weighted_confusion(labels.ravel()[idx], pred.ravel()[idx], w, 4)
    assert np.allclose(est.sum(1), full.sum(1))
    assert abs(mean_iou(est) - mean_iou(full)) < 0.01
    # the unweighted sample overstates the rare classes' share, and so their IoU
    unweighted = weighted_confusion(labels.ravel()[idx], pred.ravel()[idx], np.ones(len(idx)), 4)
    assert abs(mean_iou(unweighted) - mean_iou(full)) > abs(mean_iou(est) - mean_iou(full))


@pytest.mark.parametrize("small", [(6, 8), (5, 7), (12, 16)])
def test_gather_pixels_matches_bilinear_interpolate(small):
    rng = np.random.default_rng(3)
    probs = rng.random((2, 3, *small)).astype(np.float16)
    full = F.interpolate(torch.from_numpy(probs).float(), size=(12, 16), mode="bilinear", align_corners=False)
    idx = rng.choice(2 * 12 * 16, 100, replace=False)
    got = gather_pixels(probs, idx, (12, 16))
    want = full.permute(0, 2, 3, 1).reshape(-1, 3).numpy()[idx]
    assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-5)
    assert np.array_equal(pixel_image_index(idx, (12, 16)), idx // 192)


def test_blend_probs_axis_temperature_and_dtype():
    rng = np.random.default_rng(4)
    logits = [rng.normal(size=(2, C, 3, 4)) for _ in range(2)]
    probs = [torch.softmax(torch.from_numpy(z), 1).numpy().astype(np.float16) for z in logits]
    out = blend_probs(probs, [0.3, 0.7], [0.5, 2.0], axis=1)
    assert out.dtype == np.float32 and out.shape == (2, C, 3, 4)
    assert np.allclose(out.sum(1), 1.0, atol=1e-5)
    want = sum(w * torch.softmax(torch.from_numpy(z) / t, 1).numpy() for z, w, t in zip(logits, [0.3, 0.7], [0.5, 2]))
    assert np.allclose(out, want, atol=2e-3)  # float16 storage
    flat = [p.transpose(0, 2, 3, 1).reshape(-1, C) for p in probs]
    out_flat = blend_probs(flat, [0.3, 0.7], [0.5, 2.0], axis=-1)
    assert np.allclose(out_flat, out.transpose(0, 2, 3, 1).reshape(-1, C), atol=1e-6)
    with pytest.raises(ValueError, match="one weight per model"):
        blend_probs(probs, [1.0])


def test_finite_difference_slsqp_on_argmax_miou_stays_at_its_start(two_models):
    """The old approach: SLSQP with numeric gradients on the argmax mIoU. A 1e-8 step flips no pixel, the
    gradient is zero, and SLSQP stops at its start after one iteration, reporting success, although
    weights near (0.7, 0.3) are far better. This is why fit_blend never does it."""
    probs, y, w = two_models

    def neg_miou(x):
        return -_miou(probs, y, w, x)

    x0 = np.array([0.5, 0.5])
    res = scipy.optimize.minimize(
        neg_miou, x0, method="SLSQP", bounds=[(0, 1)] * 2,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
    )
    assert res.success and res.nit <= 1 and np.allclose(res.x, x0)
    assert _miou(probs, y, w, [0.7, 0.3]) > -res.fun + 0.1


def test_slsqp_beats_uniform_and_best_single(two_models):
    probs, y, w = two_models
    r = fit_blend(probs, y, w, C, BlendOptions("slsqp", fit_temperature=False))
    uniform = _miou(probs, y, w, [0.5, 0.5])
    best_single = max(_miou(probs, y, w, [1, 0]), _miou(probs, y, w, [0, 1]))
    assert r.moved and r.chosen == "optimiser"
    assert r.miou > uniform + 0.1 and r.miou > best_single + 0.1
    assert r.start_miou == pytest.approx(uniform)
    assert r.weights.sum() == pytest.approx(1.0) and r.weights[0] > 0.6  # less weight on overconfident B
    # the reported mIoU is what blend_probs/score_blend give with the returned parameters
    assert r.miou == pytest.approx(_miou(probs, y, w, r.weights, r.temperatures), abs=1e-12)
    # the smooth surrogate alone (no polish) already finds the good region: the sharpening makes it track
    # the argmax mIoU, where the plain soft Jaccard of the blend would peak at a single model
    surrogate_only = fit_blend(probs, y, w, C, BlendOptions("slsqp", fit_temperature=False, max_polish_evals=0))
    assert surrogate_only.miou > uniform + 0.1
    plain = fit_blend(probs, y, w, C, BlendOptions("slsqp", fit_temperature=False, max_polish_evals=0,
                                                   sharpness=(1.0,)))
    assert plain.miou < uniform + 0.05


def test_slsqp_gives_the_overconfident_model_the_higher_temperature(two_models):
    probs, y, w = two_models
    r = fit_blend(probs, y, w, C, BlendOptions("slsqp", fit_temperature=True))
    assert r.chosen == "optimiser" and r.moved
    assert r.temperatures[1] > 1.2 * r.temperatures[0]
    assert r.miou > _miou(probs, y, w, [0.5, 0.5]) + 0.1
    # classic NLL temperature scaling (used by hillclimb) also flattens B
    assert fit_temperature_nll(probs[1], y, w) > 1.5 > fit_temperature_nll(probs[0], y, w)


def test_surrogate_gradient_matches_finite_differences(two_models):
    probs, y, w = two_models
    for fit_t in (False, True):
        sur = Surrogate([p[:2000].T for p in probs], y[:2000], w[:2000], fit_temperature=fit_t, sharpness=0.3)
        x = np.array([0.35, 0.65, 0.2, -0.1])[: 4 if fit_t else 2]
        grad = sur(x)[1]
        numeric = scipy.optimize.approx_fprime(x, lambda v, f=sur: f(v)[0], 1e-6)
        assert np.abs(grad).max() > 1e-3  # a real slope, not a flat region
        assert np.allclose(grad, numeric, rtol=1e-4, atol=1e-7), (grad, numeric)
    sur = Surrogate([p[:2000].T for p in probs], y[:2000], w[:2000], fit_temperature=True, sharpness=0.3,
                    per_class=True)
    x = np.concatenate([np.linspace(0.2, 0.8, 2 * C), [0.2, -0.1]])  # (M, C) weights row-major, then log T
    grad = sur(x)[1]
    numeric = scipy.optimize.approx_fprime(x, lambda v: sur(v)[0], 1e-6)
    assert np.abs(grad[: 2 * C]).max() > 1e-4
    assert np.allclose(grad, numeric, rtol=1e-4, atol=1e-7), (grad, numeric)


def test_hillclimb_improves_over_best_single(two_models):
    probs, y, w = two_models
    r = fit_blend(probs, y, w, C, BlendOptions("hillclimb", fit_temperature=False, rounds=20))
    best_single = max(_miou(probs, y, w, [1, 0]), _miou(probs, y, w, [0, 1]))
    assert r.moved and r.chosen == "optimiser" and r.miou > best_single + 0.1
    assert r.start_miou == pytest.approx(best_single)
    counts = r.weights * 20
    assert np.allclose(counts, np.round(counts)) and r.weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["slsqp", "hillclimb", "uniform"])
def test_chosen_blend_never_below_uniform_or_best_single(method):
    """One good model and two pure-noise models: uniform weights are poor, the good model alone is best."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, C, 4000)
    probs = [_model(rng, y, range(C), strong=2.0), _softmax(rng.normal(size=(4000, C)) * 3),
             _softmax(rng.normal(size=(4000, C)) * 3)]
    w = rng.uniform(0.5, 2.0, len(y))
    r = fit_blend(probs, y, w, C, BlendOptions(method))
    floor = max(_miou(probs, y, w, np.full(3, 1 / 3)), *(_miou(probs, y, w, np.eye(3)[i]) for i in range(3)))
    assert r.miou >= floor - 1e-12
    assert r.miou == pytest.approx(_miou(probs, y, w, r.weights, r.temperatures), abs=1e-12)
    if method == "uniform":
        assert not r.moved and "did NOT move" in r.message and r.chosen == "best_single:0"


def test_nested_cv_is_not_above_in_sample(two_models):
    probs, y, w = two_models
    fold = np.random.default_rng(8).integers(0, 4, len(y))
    r = fit_blend(probs, y, w, C, BlendOptions("slsqp"))
    pooled, folds = nested_cv(probs, y, w, fold, C, BlendOptions("slsqp"))
    assert [f.fold for f in folds] == [0, 1, 2, 3]
    assert np.allclose(pooled, sum(f.confusion for f in folds))
    assert np.isclose(pooled.sum(), w.sum())  # every sample pixel scored exactly once
    nested = mean_iou(pooled)
    assert nested <= r.miou + 0.005
    assert nested > _miou(probs, y, w, [0.5, 0.5]) + 0.05  # the fitted blend still generalises
    with pytest.raises(ValueError, match="pixel_fold has shape"):
        nested_cv(probs, y, w, fold[:-1], C)


@pytest.mark.e2e
def test_nested_cv_in_a_process_pool_gives_the_serial_result(two_models):
    probs, y, w = two_models
    fold = np.random.default_rng(8).integers(0, 3, len(y))
    serial, serial_folds = nested_cv(probs, y, w, fold, C, BlendOptions("slsqp", per_class=True))
    pool = fit_pool(2)
    try:
        pooled, folds = nested_cv(probs, y, w, fold, C, BlendOptions("slsqp", per_class=True), pool)
    finally:
        pool.shutdown()
    assert np.array_equal(pooled, serial)
    assert [f.fold for f in folds] == [0, 1, 2]
    for a, b in zip(folds, serial_folds):
        assert np.array_equal(a.fit.weights, b.fit.weights) and np.array_equal(a.fit.temperatures, b.fit.temperatures)
    assert fit_pool(1) is None


def test_bad_inputs_are_clear_errors(two_models):
    probs, y, w = two_models
    with pytest.raises(ValueError, match="method='nope'"):
        BlendOptions("nope")
    with pytest.raises(ValueError, match=r"model 1 probabilities: shape \(10, 13\)"):
        fit_blend([probs[0], probs[1][:10]], y, w, C)
    with pytest.raises(ValueError, match="labels must be"):
        fit_blend(probs, np.full(len(y), C), w, C)


def _column_reliable(rng, y, reliable, noise=3.0, signal=4.0):
    """Logits whose `reliable` class columns carry the label and whose other columns are loud noise."""
    logits = np.zeros((len(y), C))
    other = ~np.isin(np.arange(C), reliable)
    logits[:, other] = rng.normal(0.0, noise, (len(y), other.sum()))
    hit = np.isin(y, reliable)
    logits[np.flatnonzero(hit), y[hit]] += signal
    return _softmax(logits)


def test_per_class_weights_trust_each_model_on_its_own_classes():
    """A's columns 0-6 are reliable, B's columns 7-12: no single weight per model can use both, per-class can."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, C, 6000)
    probs = [_column_reliable(rng, y, range(7)), _column_reliable(rng, y, range(7, 13))]
    w = np.ones(len(y))
    glob = fit_blend(probs, y, w, C, BlendOptions("slsqp"))
    pc = fit_blend(probs, y, w, C, BlendOptions("slsqp", per_class=True))
    assert pc.chosen == "optimiser" and pc.weights.shape == (2, C) and pc.moved
    assert pc.candidates["global"] == pytest.approx(glob.miou, abs=1e-12)  # the same global fit comes first
    assert pc.miou > glob.miou + 0.3, (pc.miou, glob.miou)
    assert pc.miou == pytest.approx(_miou(probs, y, w, pc.weights, pc.temperatures), abs=1e-12)
    assert np.allclose(pc.weights.sum(axis=0), 1.0)
    assert (pc.weights[0, :7] > 0.5).all() and (pc.weights[1, 7:] > 0.5).all()
    pooled, _ = nested_cv(probs, y, w, rng.integers(0, 3, len(y)), C, BlendOptions("slsqp", per_class=True))
    assert mean_iou(pooled) > glob.miou + 0.3  # held out, it still generalises
    with pytest.raises(ValueError, match="per-class weights are fitted by method 'slsqp'"):
        BlendOptions("hillclimb", per_class=True)


def test_per_class_weights_that_cannot_win_leave_the_simplest_blend(two_models):
    """Two identical models: every blend ties, so the simplest (uniform, plain (M,) weights) is returned."""
    probs, y, w = two_models
    pc = fit_blend([probs[0], probs[0].copy()], y, w, C, BlendOptions("slsqp", per_class=True, fit_temperature=False))
    assert pc.chosen == "uniform" and pc.weights.shape == (2,) and np.allclose(pc.weights, 0.5)
    assert set(pc.candidates) == {"uniform", "best_single:0", "global", "optimiser"}
    assert len(set(pc.candidates.values())) == 1


def test_blend_probs_per_class_weights_match_by_hand():
    rng = np.random.default_rng(4)
    probs = [torch.softmax(torch.randn(2, C, 3, 5), 1) for _ in range(2)]
    w = rng.uniform(size=(2, C))
    out = blend_probs(probs, w, [0.7, 1.3], axis=1)
    by_hand = sum(torch.from_numpy(wi).float()[None, :, None, None] * torch.softmax(p.log() / t, 1)
                  for p, wi, t in zip(probs, w, [0.7, 1.3]))
    assert torch.allclose(out, by_hand, atol=1e-6)
    flat = [p.permute(0, 2, 3, 1).reshape(-1, C).numpy() for p in probs]
    assert np.allclose(blend_probs(flat, w, [0.7, 1.3]), by_hand.permute(0, 2, 3, 1).reshape(-1, C).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="model 1 weight must be a number or 13 per-class numbers"):
        blend_probs(probs, [0.5, [0.5, 0.5]], axis=1)


def test_class_argmax_is_torchs_argmax_ties_included():
    from kfold.argmax import class_argmax

    x = torch.rand(3, C, 20, 30)
    x[:, 4] = x[:, 9]  # exact ties: the lower class wins, as in torch
    x[0, :, 0, 0] = 0.5  # all classes tied
    for t, dim in ((x, 1), (x.permute(0, 2, 3, 1).contiguous(), 3), (x[0].reshape(C, -1), 0), (x.half(), 1)):
        assert torch.equal(class_argmax(t, dim).long(), t.argmax(dim)), dim
        assert class_argmax(t, dim).dtype == torch.uint8


def test_column_moves_score_as_the_full_evaluation():
    """A per-class move re-scored from one column equals the mIoU of the whole blend, on every move tried."""
    from ensemble.search import ColumnMoves, Evaluator

    rng = np.random.default_rng(3)
    y = rng.integers(0, C, 5000)
    probs = [_model(rng, y, range(m, C, 3)) for m in range(3)]
    probs[2][:100] = probs[0][:100]  # exact ties between models on some pixels
    for q in probs:
        q[100:150] = np.float32(1 / C)  # and between classes: every class equal, for every model
    class_weights = rng.uniform(0.5, 3.0, C)  # population / sample counts, as the pixel sample's
    ev = Evaluator(probs, y, class_weights[y], C)
    w = rng.dirichlet(np.ones(3), size=C).T  # (M, C), each class column on the simplex
    temps = np.array([1.0, 0.7, 1.5])
    moves = ColumnMoves(ev, w, temps)
    for _ in range(40):
        c, i, j = rng.integers(C), *rng.choice(3, 2, replace=False)
        moved = w.copy()
        d = min(0.1, moved[j, c])
        moved[i, c] += d
        moved[j, c] -= d
        assert moves.miou(moved, int(c)) == ev.miou(moved, temps)
