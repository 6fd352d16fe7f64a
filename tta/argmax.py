"""The argmax over classes as a uint8 class map, faster on CPU than ``torch.argmax`` over a non-innermost axis.

Scoring a store at label resolution takes the argmax of (n, C, H, W) probabilities, and the blend's fit takes
it of class-major (C, P) samples: in both the class axis is not the innermost one, where torch's argmax
kernel is slow on CPU. No library offers a faster one, hence this function.
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_argmax(x: Tensor, dim: int = 1) -> Tensor:
    """``x.argmax(dim)`` as uint8 (at most 256 classes): the same indices, the first of tied classes as torch.

    A max pass and one compare per class is ~3x faster than torch's argmax over a non-innermost axis
    (measured on 2 cores, 1 thread: (4, 13, 480, 640) float32 60 ms vs 196 ms; (13, 300k) 11 ms vs 44 ms).

    Args:
        x: scores with classes along ``dim`` (no NaN).
        dim: class axis.
    """
    if x.stride(dim) == 1:  # classes innermost: torch's own kernel is the fast one
        return x.argmax(dim).to(torch.uint8)
    top = x.amax(dim)
    classes = x.movedim(dim, 0)
    out = torch.full(top.shape, classes.shape[0] - 1, dtype=torch.uint8, device=x.device)
    for c in range(classes.shape[0] - 2, -1, -1):  # downwards: the lowest tied class is written last
        out.masked_fill_(classes[c] == top, c)
    return out

