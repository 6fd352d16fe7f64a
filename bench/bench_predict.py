"""Predictor: ``ensemble.predict.member_probs`` (a batch of images through each fold model, TTA views batched)
against a plain loop over images, fold models and views (one image, one view per forward pass), on the same
five fold models: images/s and the largest difference of their fold-mean probabilities.

The plain loop is written here as the reference a user would write by hand: for every image, every fold
model, every scale and flip, resize, forward, softmax, undo the view, average. Where a scaled size is not a
multiple of the encoder stride the loop resizes to one while ours pads (reflect) and crops, so the two
differ there by design; at scale 1 on a stride-multiple size they must agree to float16 rounding.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from common import best_time, parse_args, pick, result

from ensemble.bundle import MemberBundle
from ensemble.predict import LoadedMember, member_probs, model_input
from kfold.config import build_recipe
from kfold.data.transforms import EvalTransform
from kfold.models import model_from_recipe


def plain_loop(models: Sequence[torch.nn.Module], inputs: torch.Tensor, scales: Sequence[float],
               size: tuple[int, int]) -> np.ndarray:
    """Fold-mean probabilities (n, C, h, w): one image and one view per forward pass."""
    out = []
    with torch.inference_mode():
        for x in inputs:
            base = x.shape[-2:]
            acc = 0.0
            for model in models:
                views = 0.0
                for scale in scales:
                    hw = [max(1, int(s * scale + 0.5)) for s in base]
                    hw = [-(-s // 32) * 32 for s in hw]  # the plain loop resizes to a stride multiple
                    scaled = F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False)
                    for flip in (False, True):
                        logits = model(scaled.flip(-1) if flip else scaled)
                        logits = logits.flip(-1) if flip else logits
                        logits = F.interpolate(logits, size=tuple(base), mode="bilinear", align_corners=False)
                        views = views + torch.softmax(logits, dim=1)
                probs = views / (2 * len(scales))
                acc = acc + F.interpolate(probs, size=size, mode="bilinear", align_corners=False).half().float()
            out.append((acc / len(models))[0].numpy())
    return np.stack(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    size = pick(args.mode, (128, 160), (96, 128), (64, 64))
    n_images = pick(args.mode, 16, 8, 2)
    scales = pick(args.mode, (0.75, 1.0, 1.25), (1.0, 1.25), (1.0,))
    recipe = build_recipe({"data.input_size": size, "data.crop_size": size, "tta.scales": scales,
                           "tta.max_batch": 32, "oof.batch_size": n_images, "model.depth_head": False}, "smoke")
    torch.manual_seed(0)
    models = [model_from_recipe(recipe, 13, pretrained=False).eval() for _ in range(5)]
    member = LoadedMember(MemberBundle("bench", recipe, (), size), models)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n_images)]
    inputs = torch.stack([model_input(i, None, EvalTransform(size), 3) for i in images])
    cpu = torch.device("cpu")
    with torch.inference_mode():
        member_probs(member, images[:1], [None], cpu)  # warm-up
    repeat = pick(args.mode, 3, 2, 1)
    t_ours, ours = best_time(lambda: member_probs(member, images, [None] * n_images, cpu), repeat)
    t_ref, ref = best_time(lambda: plain_loop(models, inputs, scales, size), repeat)
    views = 2 * len(scales)
    result("predict", f"5 folds x {views} views, {n_images} img {size[0]}x{size[1]}",
           f"{n_images / t_ours:.2f} img/s", "plain loop", f"{n_images / t_ref:.2f} img/s", t_ref / t_ours,
           max_abs_diff=f"{np.abs(ours - ref).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
