"""Class maps: ``kfold.argmax`` (numba kernels) against torch, on a chunk of a store at NYUv2 size.

Two figures, both sides on the same tensors in this process: the argmax over the class axis of (4, 13, 480,
640) float32 (``class_argmax`` against ``torch.argmax(dim=1)``), and a chunk of 4 float16 store images of
13 x 240x320 upsampled bilinearly to 480x640 and argmaxed (``upsampled_argmax`` in one pass against torch's
``interpolate`` then ``argmax``). The first must be identical; the second may differ only where two classes
are within float rounding (torch itself rounds differently along different code paths).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from common import best_time, fmt_s, parse_args, pick, result

from kfold.argmax import class_argmax, upsampled_argmax

C = 13


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    (h, w), repeat = pick(args.mode, ((240, 320), 10), ((240, 320), 5), ((24, 32), 1))
    size = (2 * h, 2 * w)
    g = torch.Generator().manual_seed(0)
    store = torch.rand(4, C, h, w, generator=g).softmax(1).half()  # what iter_oof reads, before widening
    upsampled = F.interpolate(store.float(), size=size, mode="bilinear", align_corners=False)
    t_ref, ref = best_time(lambda: upsampled.argmax(1), repeat)
    t_ours, ours = best_time(lambda: class_argmax(upsampled, 1), repeat)
    result("argmax", f"class argmax 4x{C}x{size[0]}x{size[1]}", fmt_s(t_ours), "torch", fmt_s(t_ref),
           t_ref / t_ours, identical=bool(torch.equal(ours.long(), ref)))

    def torch_steps() -> torch.Tensor:
        return F.interpolate(store.float(), size=size, mode="bilinear", align_corners=False).argmax(1)

    t_ref, ref = best_time(torch_steps, repeat)
    t_ours, ours = best_time(lambda: upsampled_argmax(store, size), repeat)
    same = (ours.long() == ref).double().mean().item()
    result("argmax", f"upsample + argmax 4x{C}x{h}x{w} f16", fmt_s(t_ours), "torch", fmt_s(t_ref), t_ref / t_ours,
           same_pixels=f"{100 * same:.4f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
