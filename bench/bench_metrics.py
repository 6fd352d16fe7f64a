"""Metrics: ``kfold.metrics.confusion_matrix`` against ``sklearn.metrics.confusion_matrix`` on 50M pixels.

Both get the same arrays: labels with ~5% ignore pixels (255) and predictions that agree with the labels
about 70% of the time. sklearn drops the 255s because they are not in ``labels=range(13)``. The main
figure uses uint8 predictions (cast argmax output with ``.astype(np.uint8)``); a second line shows int64
predictions (what ``argmax`` returns), which ours handles through the slower int64 bincount path.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import sklearn.metrics
from common import best_time, fmt_s, parse_args, pick, result

from kfold.metrics import confusion_matrix

C = 13


def make_pair(n_pixels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 labels (with 255s) and uint8 predictions of ``n_pixels`` pixels."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, C, size=n_pixels, dtype=np.uint8)
    target[rng.random(n_pixels) < 0.05] = 255
    pred = np.where(rng.random(n_pixels) < 0.7, target % C, rng.integers(0, C, size=n_pixels)).astype(np.uint8)
    return target, pred


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    n = pick(args.mode, 50_000_000, 50_000_000, 200_000)
    repeat_ours, repeat_ref = pick(args.mode, (5, 2), (3, 1), (1, 1))
    target, pred = make_pair(n)
    labels = list(range(C))
    t_ref, ref = best_time(lambda: sklearn.metrics.confusion_matrix(target, pred, labels=labels), repeat_ref)
    t_ours, ours = best_time(lambda: confusion_matrix(target, pred, C), repeat_ours)
    px = f"{n / 1e6:.0f}M px" if n >= 1e6 else f"{n / 1e3:.0f}k px"
    result("metrics", f"confusion {px}, uint8 pred", fmt_s(t_ours), "sklearn", fmt_s(t_ref), t_ref / t_ours,
           identical=bool(np.array_equal(ours, ref)))
    pred64 = pred.astype(np.int64)
    t_ours64, ours64 = best_time(lambda: confusion_matrix(target, pred64, C), repeat_ours)
    result("metrics", f"confusion {px}, int64 pred", fmt_s(t_ours64), "sklearn", fmt_s(t_ref), t_ref / t_ours64,
           identical=bool(np.array_equal(ours64, ref)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
