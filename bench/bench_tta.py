"""TTA: ours (``tta.predict_tta``) against ttach on the same smp model on CPU: images/s and largest difference.

Ours runs the flipped and unflipped views of a scale in one forward pass; ttach runs one pass per view.
ttach gets the model with a softmax appended (``merge_mode="mean"`` then averages probabilities, as ours
does) and bilinear resizing with ``align_corners=False`` (its default is nearest). Scales are only those
where ttach works: it cannot pad, so every scaled size must stay a multiple of the encoder stride (32).
With scales, ours resizes logits before the softmax (mmsegmentation's convention) while ttach resizes the
softmaxed output, so the two differ there by design; with flips only they must agree to float precision.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import ttach
from common import best_time, parse_args, pick, result
from torch import nn

from kfold.models import build_model
from tta import TTAConfig, predict_tta


def compare(model: nn.Module, images: torch.Tensor, scales: tuple[float, ...], repeat: int, label: str,
            max_batch: int = 64) -> None:
    cfg = TTAConfig(scales=scales, hflip=True, stride=32, max_batch=max_batch)
    transforms = [ttach.HorizontalFlip()]
    extra = [s for s in scales if s != 1.0]
    if extra:
        transforms.append(ttach.Scale(scales=extra, interpolation="bilinear", align_corners=False))
    wrapper = ttach.SegmentationTTAWrapper(nn.Sequential(model, nn.Softmax(dim=1)), ttach.Compose(transforms),
                                           merge_mode="mean")
    with torch.inference_mode():
        predict_tta(model, images[:1], cfg)  # warm-up (allocator, oneDNN kernels)
        wrapper(images[:1])
        t_ours, ours = float("inf"), None
        t_ref, ref = float("inf"), None
        for i in range(repeat):  # interleaved, so a burst of load on the shared machine hits both sides,
            for side in ((0, 1) if i % 2 == 0 else (1, 0)):  # and in alternating order: the second runs warmer
                if side == 0:
                    t, out = best_time(lambda: predict_tta(model, images, cfg).probs[1.0], 1)
                    t_ours, ours = min(t_ours, t), out
                else:
                    t, out = best_time(lambda: wrapper(images), 1)
                    t_ref, ref = min(t_ref, t), out
    n = images.shape[0]
    diff = (ours - ref).abs().max().item()
    result("tta", f"{label}, max_batch {max_batch}", f"{n / t_ours:.2f} img/s", "ttach", f"{n / t_ref:.2f} img/s",
           t_ref / t_ours, max_abs_diff=f"{diff:.2e}", views=cfg.num_views)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    size = pick(args.mode, (256, 320), (256, 320), (64, 64))
    batches = pick(args.mode, (1, 8), (1, 4), (1, 2))
    repeat = pick(args.mode, 5, 2, 1)
    torch.manual_seed(0)
    model = build_model("fpn", "resnet18", None, 3, 13, depth_head=False).eval()
    h, w = size
    # max_batch 64 runs a batch's flipped and unflipped views in one forward pass of 2B images; max_batch B
    # runs them as two passes of B, as ttach does (on this CPU one pass of 16 took ~10% longer than two of 8).
    for b in batches:
        images = torch.randn(b, 3, h, w)
        for max_batch in sorted({64, b}):
            compare(model, images, (1.0,), repeat, f"flip, batch {b}, {h}x{w}", max_batch)
    images = torch.randn(batches[-1], 3, h, w)
    for max_batch in (64, batches[-1]):
        compare(model, images, (0.5, 1.0, 1.5), max(1, repeat - 1),
                f"flip x (0.5,1,1.5), batch {batches[-1]}, {h}x{w}", max_batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
