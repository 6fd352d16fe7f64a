"""Scaling of our blend optimisation: time as the number of models (2, 4, 8) and of pixels grows.

Two tables and one figure, all on in-memory fake stores (complementary models, float16, the store layout
(N, C, h, w)), with the steps ``ensemble.stores.build_sample`` runs on real stores:

* fit only: ``fit_blend`` (slsqp, temperatures fitted) on a pixel sample of P pixels;
* sampling: ``stratified_pixel_sample`` + ``gather_pixels`` of ``ensemble/blend.py``'s default 300,000
  pixels from stores of growing size (the only step whose cost grows with the store: the fit sees the
  sample only). Stores repeat their first 50 generated images (generating gigabytes of fake
  probabilities would dominate the run; the timed steps do not depend on the values being new);
* the issue-5 figure: 4 models x 400 images x 13 classes at 240x320 (full mode; ``--quick`` runs a
  quarter of the images at half the size and says so).

Reading stores from disk is not in these tables (``bench_oof_store.py`` measures it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
from common import complementary_models, fake_probs, note, parse_args, pick, result

from ensemble.optimize import BlendOptions, fit_blend
from ensemble.sampling import gather_pixels, stratified_pixel_sample

C = 13
MODELS = (2, 4, 8)


def fake_labels(n: int, size: tuple[int, int], rng: np.random.Generator, block: int = 8) -> np.ndarray:
    """(n, h, w) uint8 labels made of constant blocks (segments), ~3% ignore (255)."""
    h, w = size
    coarse = rng.integers(0, C, size=(n, -(-h // block), -(-w // block)), dtype=np.uint8)
    labels = coarse.repeat(block, axis=1).repeat(block, axis=2)[:, :h, :w]
    labels[rng.random(labels.shape) < 0.03] = 255
    return np.ascontiguousarray(labels)


def fake_stores(n_models: int, labels: np.ndarray, seed: int = 0, chunk: int = 25,
                distinct: int | None = None) -> list[np.ndarray]:
    """float16 (N, C, h, w) per model, generated ``chunk`` images at a time to bound the temporaries.

    With ``distinct``, only the first ``distinct`` images are generated and the rest repeat them (the
    labels must repeat the same way): the timed steps do not depend on the pixel values being new.
    """
    stores = []
    n = labels.shape[0] if distinct is None else min(distinct, labels.shape[0])
    for m, (skill, confidence) in enumerate(complementary_models(n_models, C, seed)):
        rng = np.random.default_rng([seed, m])
        out = np.empty((labels.shape[0], C, *labels.shape[1:]), dtype=np.float16)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            out[start:stop] = fake_probs(labels[start:stop], skill, confidence, rng)
        for start in range(n, len(out), n):
            out[start : start + n] = out[: min(n, len(out) - start)]
        stores.append(out)
    return stores


def sample_and_fit(stores: list[np.ndarray], labels: np.ndarray, n_pixels: int) -> tuple[float, float, object]:
    """(seconds to sample, seconds to fit, the fit) as build_sample + fit_blend do it."""
    t0 = time.perf_counter()
    index, weights = stratified_pixel_sample(labels, C, n_pixels, seed=0)
    size = labels.shape[1:]
    probs = [gather_pixels(s, index, size) for s in stores]
    sample_labels = labels.reshape(-1)[index].astype(np.int64)
    t1 = time.perf_counter()
    fit = fit_blend(probs, sample_labels, weights, C, BlendOptions("slsqp", fit_temperature=True))
    return t1 - t0, time.perf_counter() - t1, fit


def table(title: str, cols: Sequence[str], rows: dict[int, list[float]]) -> None:
    print(f"scaling   {title}", flush=True)
    print("          " + f"{'models':>8}" + "".join(f"{c:>14}" for c in cols), flush=True)
    for m, values in rows.items():
        print("          " + f"{m:>8}" + "".join(f"{v:>12.2f} s" for v in values), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    rng = np.random.default_rng(0)
    sample_sizes = pick(args.mode, (100_000, 300_000), (25_000, 100_000), (1_000, 3_000))
    store_images = pick(args.mode, (100, 200, 400), (50, 100, 200), (8, 16))
    store_size = pick(args.mode, (120, 160), (60, 80), (16, 24))
    big_pixels = pick(args.mode, 300_000, 300_000, 3_000)

    # Fit only: a pool of fake sample pixels (one pixel per "image" row) cut to each size.
    pool_labels = fake_labels(1, (1, max(sample_sizes)), rng, block=1)[0, 0]
    pool_labels[pool_labels == 255] = 0
    pool = fake_stores(max(MODELS), pool_labels[None, None, :], seed=1)
    rows = {}
    for m in MODELS:
        rows[m] = []
        for p in sample_sizes:
            probs = [s[0, :, 0, :p].T.astype(np.float32) for s in pool[:m]]
            fit = fit_blend(probs, pool_labels[:p].astype(np.int64), np.ones(p), C,
                            BlendOptions("slsqp", fit_temperature=True))
            rows[m].append(fit.seconds)
    table("fit_blend seconds (slsqp + temperatures) by sample pixels", [f"{p:,} px" for p in sample_sizes], rows)

    # Sampling from stores of growing size.
    rows = {m: [] for m in MODELS}
    h, w = store_size
    for n in store_images:
        distinct = min(n, 50)
        labels = np.resize(fake_labels(distinct, store_size, rng), (n, *store_size))
        stores = fake_stores(max(MODELS), labels, seed=2, distinct=distinct)
        for m in MODELS:
            t0 = time.perf_counter()
            index, _ = stratified_pixel_sample(labels, C, big_pixels, seed=0)
            for s in stores[:m]:
                gather_pixels(s, index, store_size)
            rows[m].append(time.perf_counter() - t0)
        del stores
    table(f"sampling {big_pixels:,} px: seconds by store size (images x {C} x {h}x{w}, float16)",
          [f"{n * h * w / 1e6:.1f}M px" for n in store_images], rows)

    # Issue 5: 4 models x 400 images x 13 classes at 240x320.
    n, size = pick(args.mode, (400, (240, 320)), (100, (120, 160)), (8, (24, 32)))
    distinct = pick(args.mode, 50, 50, 8)  # generating 3.3 GB of fake probabilities would dominate the run
    labels = np.resize(fake_labels(distinct, size, rng), (n, *size))  # repeats the distinct images in order
    stores = fake_stores(4, labels, seed=3, distinct=distinct)
    gb = sum(s.nbytes for s in stores) / 2**30
    t_sample, t_fit, fit = sample_and_fit(stores, labels, big_pixels)
    total = t_sample + t_fit
    result("scaling", f"4 models x {n} x {C} x {size[0]}x{size[1]}", f"{total:.1f} s", "goal", "60 s",
           60.0 / total, sample_s=f"{t_sample:.1f}", fit_s=f"{t_fit:.1f}", stores_gb=f"{gb:.2f}",
           under_a_minute=total < 60, moved=fit.moved, distinct_images=distinct)
    if args.mode != "full":
        note(f"{args.mode} mode: not the issue-5 size (400 x 240x320); run without --quick for that figure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
