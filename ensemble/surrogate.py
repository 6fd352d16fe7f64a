"""The smooth stand-in for blend mIoU that SLSQP can follow: soft Jaccard of sharpened blended probabilities.

mIoU of ``argmax(sum_m w_m p_m)`` is piecewise constant in the weights, so its gradient is useless; this
surrogate has an exact gradient (torch autograd) and tends to the true mIoU as the sharpening goes to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def soft_jaccard(
    logp: Sequence[Tensor],
    labels: Tensor,
    sample_weight: Tensor,
    weights: Tensor,
    log_temperatures: Tensor,
    sharpness: float = 0.1,
) -> Tensor:
    """Smooth mIoU surrogate: mean over labelled classes of sum(s*q*y) / sum(s*(q + y - q*y)).

    q = softmax(log(sum_m w_m softmax(logp_m / T_m)) / sharpness): the blend sharpened towards its argmax.
    Without sharpening the soft IoU of each class is a ratio of two linear functions of the weights, so the
    surrogate peaks at a single model and misses the gain of averaging, which comes from the argmax.

    Args:
        logp: per model (C, P) log-probabilities, class-major (float64 for an accurate gradient).
        labels: (P,) int64 class ids.
        sample_weight: (P,) pixel weights (same dtype as logp).
        weights: (M,) blend weights, or (M, C) per-class ones; log_temperatures: (M,) log T per model.
        sharpness: temperature of the final sharpening (1 = none; -> 0 tends to the piecewise-constant mIoU).
    """
    num_classes = logp[0].shape[0]
    per_class = weights.ndim == 2
    terms = zip(logp, weights, log_temperatures)
    q = sum((w[:, None] if per_class else w) * torch.softmax(lp * torch.exp(-lt), dim=0) for lp, w, lt in terms)
    q = torch.softmax(q.log() / sharpness, dim=0)
    q_true = q.gather(0, labels[None])[0]
    inter = torch.zeros(num_classes, dtype=q.dtype).index_add(0, labels, sample_weight * q_true)
    target = torch.zeros(num_classes, dtype=q.dtype).index_add(0, labels, sample_weight)
    pred_mass = (sample_weight[None] * q).sum(1)
    present = target > 0
    iou = inter[present] / (pred_mass[present] + target[present] - inter[present])
    return iou.mean()


class Surrogate:
    """scipy objective ``x -> (-soft_jaccard, gradient)`` with x = [weights (M*K), log T (M) if fitted].

    Args:
        model_probs: per model (C, P) probabilities, class-major (numpy or tensor).
        labels: (P,) class ids; sample_weight: (P,) pixel weights.
        fit_temperature: whether x carries log-temperatures (else T = 1).
        sharpness: see ``soft_jaccard``.
        per_class: weights are (M, C), row-major in x (K = C), else (M,) (K = 1).
    """

    def __init__(
        self,
        model_probs: Sequence[np.ndarray | Tensor],
        labels: np.ndarray | Tensor,
        sample_weight: np.ndarray | Tensor,
        fit_temperature: bool,
        sharpness: float = 0.1,
        per_class: bool = False,
    ):
        self.logp = [torch.as_tensor(p).double().clamp_min(1e-30).log() for p in model_probs]
        self.labels = torch.as_tensor(labels).long()
        self.sample_weight = torch.as_tensor(sample_weight, dtype=torch.float64)
        self.n_models = len(self.logp)
        self.fit_temperature = fit_temperature
        self.sharpness = sharpness
        self.n_weights = self.n_models * (self.logp[0].shape[0] if per_class else 1)
        self.n_evals = 0

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        self.n_evals += 1
        m, nw = self.n_models, self.n_weights
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        w = xt[:nw].reshape(m, -1) if nw > m else xt[:m]
        lt = xt[nw:] if self.fit_temperature else torch.zeros(m, dtype=torch.float64)
        loss = -soft_jaccard(self.logp, self.labels, self.sample_weight, w, lt, self.sharpness)
        (grad,) = torch.autograd.grad(loss, xt)
        return float(loss.detach()), grad.numpy()
