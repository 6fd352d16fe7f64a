"""A finished blend as a self-contained folder that predicts without ``runs/``:

    python -m ensemble.export --blend NAME --out DIR
    python -m ensemble.predict --model DIR --images IMAGES --out MASKS

The folder holds each fold model's weights (safetensors), each member's resolved recipe, ``blend.json``
(weights, temperatures, classes, TTA, store sizes, the folds' sha256 and every file's sha256) and a
README.txt. It is written under a staging name and renamed when whole.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import yaml

from ensemble.bundle import BLEND_FILE, EXPORT_FORMAT, BlendBundle, open_from_runs
from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.io import sha256_file, staged_folder, write_text
from kfold.config import to_dict

README = """This folder is the blend {name!r}, exported by foldwise (python -m ensemble.export).

Predict class-id masks for a folder of {h}x{w} RGB images ({depth}):

    python -m ensemble.predict --model THIS_FOLDER --images IMAGES --out MASKS [--probs] [--color]

It needs the foldwise package installed (pip install -e . in a clone), not the runs folder. blend.json
lists every file with its sha256; a folder whose files do not match is refused.

Classes (mask value = index; 255 never occurs): {classes}
Members: {members}
"""


def export_blend(blend: BlendBundle, out: Path) -> Path:
    """Write ``blend`` into the new folder ``out``; return it."""
    with staged_folder(out) as staging:
        entries = []
        for member in blend.members:
            folder = Path("members") / member.name
            (staging / folder).mkdir(parents=True)
            recipe_file = folder / "recipe.yaml"
            write_text(staging / recipe_file, yaml.safe_dump(to_dict(member.recipe), sort_keys=False))
            folds = []
            for k, weights in enumerate(member.weights_files):
                target = folder / f"fold{k}.safetensors"
                shutil.copyfile(weights, staging / target)
                folds.append({"file": str(target), "sha256": sha256_file(staging / target)})
            t = member.recipe.tta
            entries.append({"name": member.name, "store_size": list(member.store_size), "folds": folds,
                            "recipe": {"file": str(recipe_file), "sha256": sha256_file(staging / recipe_file)},
                            "tta": {"scales": list(t.scales), "hflip": t.hflip, "temperature": t.temperature},
                            "in_channels": member.recipe.data.in_channels})
        record = {"format": EXPORT_FORMAT, "name": blend.name, "classes": list(blend.classes),
                  "class_map": blend.class_map, "image_size": list(blend.image_size),
                  "weights": blend.weights.tolist(), "temperatures": blend.temperatures.tolist(),
                  "folds_sha256": blend.folds_sha256, "members": entries,
                  "created": datetime.now(UTC).isoformat(timespec="seconds")}
        write_text(staging / BLEND_FILE, json.dumps(record, indent=2) + "\n")
        needs_depth = any(m.recipe.data.in_channels == 4 for m in blend.members)
        write_text(staging / "README.txt", README.format(
            name=blend.name, h=blend.image_size[0], w=blend.image_size[1],
            depth="and --depths DEPTHS: 16-bit mm PNGs <id>.png" if needs_depth else "no depth needed",
            classes=", ".join(blend.classes), members=", ".join(m.name for m in blend.members)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m ensemble.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--blend", required=True, help="a blend written by ensemble/blend.py (submissions/NAME.json)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to create (new or empty)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--submissions", type=Path, default=Path("submissions"))
    args = parser.parse_args(argv)

    def body() -> None:
        blend = open_from_runs(args.submissions / f"{args.blend}.json", args.runs_dir)
        export_blend(blend, args.out)
        n = sum(len(m.weights_files) for m in blend.members)
        print(f"wrote {args.out}: {len(blend.members)} member(s), {n} fold models, {BLEND_FILE}, README.txt")

    return run_entry_point(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
