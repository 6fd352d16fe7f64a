"""A finished blend on new images: every fold model of every member, each with its recipe's preprocessing and
TTA, its temperature and its weights, the folds averaged as the submission's test stores were.

    python -m ensemble.predict --blend NAME --images DIR [--depths DIR] --out DIR [--probs] [--color]
    python -m ensemble.predict --model EXPORTED_DIR --images DIR --out DIR

Writes ``<out>/<id>.png`` class-id masks at the input image's resolution (``--probs``: also float16
``<id>.npy`` blended probabilities at the blend grid; ``--color``: ``<id>_color.png`` and ``<id>_overlay.png``).
Every step is the one that made the submission: the fold store's probabilities (``kfold.store.write``), the
mean over folds (``kfold.store.read``), the grid and the blend (``ensemble.stores``), so on the root's own test
images the masks equal the submission's. A bad image is one line and skipped; the exit code is then 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ensemble.bundle import BlendBundle, MemberBundle, open_export, open_from_runs
from ensemble.stores import blend_grid, blend_on_grid, to_grid
from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.figures import class_colours
from foldwise.io import atomic_path, write_png
from kfold.data.dataset import model_input
from kfold.data.layout import DataError, read_depth, read_rgb
from kfold.data.transforms import EvalTransform
from kfold.models import amp_dtype, load_weights, model_from_recipe
from kfold.store.read import full_res_argmax, mean_of_folds
from kfold.store.write import autocast_forward, predict_rows, tta_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class LoadedMember:
    """One member's fold models, ready to predict."""

    bundle: MemberBundle
    models: list[nn.Module]


def load_models(blend: BlendBundle, device: torch.device) -> list[LoadedMember]:
    loaded = []
    for member in blend.members:
        models = []
        for weights in member.weights_files:
            model = model_from_recipe(member.recipe, len(blend.classes), pretrained=False)
            load_weights(model, weights)
            models.append(model.to(device).eval())
        loaded.append(LoadedMember(member, models))
    return loaded


def member_probs(member: LoadedMember, images: Sequence[np.ndarray], depths: Sequence[np.ndarray | None],
                 device: torch.device) -> np.ndarray:
    """float32 (n, C, h, w) probabilities of one member at its store size, averaged over its fold models.

    Images go through each model in the member's prediction batch (``oof.batch_size``) and views in its TTA
    batches, as its fold stores were written (same batches, same float16 rounding, same fold mean).
    """
    recipe = member.bundle.recipe
    transform = EvalTransform(recipe.data.input_size)
    x = torch.stack([model_input(img, dep, transform, recipe.data.in_channels) for img, dep in zip(images, depths)])
    cfg, T, size = tta_config(recipe), float(recipe.tta.temperature), member.bundle.store_size
    amp, step = amp_dtype(recipe.train.amp, device), recipe.oof.batch_size
    per_fold = []
    for model in member.models:
        forward = autocast_forward(model, device, amp)
        rows = [predict_rows(forward, x[i : i + step].to(device), cfg, size, T)[0] for i in range(0, len(x), step)]
        per_fold.append(torch.cat(rows).cpu().numpy())
    return mean_of_folds(per_fold)


def predict_probs(members: list[LoadedMember], blend: BlendBundle, images: Sequence[np.ndarray],
                  depths: Sequence[np.ndarray | None], device: torch.device) -> torch.Tensor:
    """The blend's probabilities (n, C, h, w) on its grid for a batch of equally sized images."""
    grid = blend_grid([m.bundle.store_size for m in members])
    probs = [to_grid(member_probs(m, images, depths, device), grid) for m in members]
    return blend_on_grid(probs, (blend.weights, blend.temperatures))


def predict_masks(members: list[LoadedMember], blend: BlendBundle, images: Sequence[np.ndarray],
                  depths: Sequence[np.ndarray | None], device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """(class ids (n, H, W) uint8, blended probabilities on the grid) of a batch of equally sized images."""
    blended = predict_probs(members, blend, images, depths, device)
    return full_res_argmax(blended, blend.image_size).numpy(), blended  # the steps of ensemble.stores.blend_argmax


def _read_one(path: Path, depths_dir: Path | None, needs_depth: bool, size: tuple[int, int]
              ) -> tuple[np.ndarray, np.ndarray | None]:
    image = read_rgb(path)
    if image.shape[:2] != tuple(size):
        raise DataError(f"{path}: size {image.shape[0]}x{image.shape[1]} (HxW); the blend's members were trained "
                        f"on {size[0]}x{size[1]} images")
    if not needs_depth:
        return image, None
    if depths_dir is None:
        raise DataError(f"{path}: an RGB-D member needs its depth; pass --depths DIR (<id>.png, 16-bit mm)")
    depth_path = depths_dir / f"{path.stem}.png"
    if not depth_path.is_file():
        raise DataError(f"{depth_path}: missing depth for image {path.stem!r} (an RGB-D member needs it)")
    depth = read_depth(depth_path)
    if depth.shape != tuple(size):
        raise DataError(f"{depth_path}: size {depth.shape[0]}x{depth.shape[1]} differs from its image's")
    return image, depth


def _write_outputs(out: Path, image_id: str, image: np.ndarray, mask: np.ndarray, probs: torch.Tensor | None,
                   colours: np.ndarray | None) -> None:
    write_png(out / f"{image_id}.png", mask)
    if probs is not None:
        with atomic_path(out / f"{image_id}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, probs.numpy().astype(np.float16))
    if colours is not None:
        colour = colours[mask]
        write_png(out / f"{image_id}_color.png", colour)
        write_png(out / f"{image_id}_overlay.png", (0.5 * image + 0.5 * colour).astype(np.uint8))


def predict_folder(blend: BlendBundle, images_dir: Path, out: Path, depths_dir: Path | None = None, batch: int = 0,
                   device: str = "cpu", with_probs: bool = False, color: bool = False) -> tuple[int, list[str]]:
    """Predict every image of ``images_dir`` into ``out``; return (masks written, one line per skipped image)."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: images folder not found")
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise FileNotFoundError(f"{images_dir}: no images (*.png, *.jpg)")
    needs_depth = any(m.recipe.data.in_channels == 4 for m in blend.members)
    if needs_depth and depths_dir is None:
        raise ValueError(f"blend {blend.name!r} has RGB-D members: pass --depths DIR (<id>.png, 16-bit mm)")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: a file, not a folder")
    dev = torch.device(device)
    members = load_models(blend, dev)
    batch = batch or max(m.bundle.recipe.oof.batch_size for m in members)
    colours = class_colours(len(blend.classes)) if color else None
    out.mkdir(parents=True, exist_ok=True)
    written, problems, start = 0, [], time.perf_counter()
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not sys.stderr.isatty())
    for lo in range(0, len(paths), batch):
        good: list[tuple[Path, np.ndarray, np.ndarray | None]] = []
        for path in paths[lo : lo + batch]:
            try:
                good.append((path, *_read_one(path, depths_dir, needs_depth, blend.image_size)))
            except (DataError, OSError) as err:
                problems.append(" ".join(str(err).split()))
                print(f"skipped: {problems[-1]}", file=sys.stderr)
        if good:
            with torch.inference_mode():
                masks, probs = predict_masks(members, blend, [g[1] for g in good], [g[2] for g in good], dev)
            for i, (path, image, _) in enumerate(good):
                _write_outputs(out, path.stem, image, masks[i], probs[i] if with_probs else None, colours)
                written += 1
        bar.update(len(paths[lo : lo + batch]))
        bar.set_postfix(img_s=f"{written / (time.perf_counter() - start):.2f}")
    bar.close()
    return written, problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m ensemble.predict", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--blend", help="a blend written by ensemble/blend.py (submissions/NAME.json)")
    source.add_argument("--model", type=Path, help="a folder written by python -m ensemble.export")
    parser.add_argument("--images", type=Path, required=True, help="folder of RGB images (<id>.png / .jpg)")
    parser.add_argument("--depths", type=Path, help="folder of 16-bit mm depth PNGs <id>.png (RGB-D members)")
    parser.add_argument("--out", type=Path, required=True, help="folder for <id>.png masks")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="with --blend: the experiments")
    parser.add_argument("--submissions", type=Path, default=Path("submissions"), help="with --blend: its folder")
    parser.add_argument("--batch", type=int, default=0, help="images per step (default: the members' oof batch)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tta-scales", type=float, nargs="+", help="override every member's TTA scales")
    parser.add_argument("--probs", action="store_true", help="also write float16 <id>.npy probabilities")
    parser.add_argument("--color", action="store_true", help="also write <id>_color.png and <id>_overlay.png")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.batch < 0:
            raise ValueError(f"--batch {args.batch}: must be >= 1 (0 = the members' own)")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        bad = [s for s in args.tta_scales or [] if not 0 < s <= 8]
        if bad:
            raise ValueError(f"--tta-scales {bad[0]}: each scale must be in (0, 8]")
        if args.depths is not None and not args.depths.is_dir():
            raise FileNotFoundError(f"--depths {args.depths}: no such folder")
        blend = (open_export(args.model) if args.model
                 else open_from_runs(args.submissions / f"{args.blend}.json", args.runs_dir))
        if args.tta_scales:
            blend = blend.with_tta_scales(tuple(args.tta_scales))
        written, problems = predict_folder(blend, args.images, args.out, args.depths, args.batch, args.device,
                                           args.probs, args.color)
        print(f"wrote {written} masks to {args.out}" + (f"; skipped {len(problems)} image(s)" if problems else ""))
        if problems:
            print(f"error: {len(problems)} image(s) skipped (lines above); the other masks are written",
                  file=sys.stderr)
            return 1
        return 0

    return run_entry_point(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
