"""A dataset root's train split as webdataset tar shards, for training that streams its data.

Usage:
    python -m kfold.data.shards --data-root data/sidewalk [--out data/sidewalk/shards] [--shard-size 256]

Each sample is one image's files, byte for byte (``<id>.image.png``, ``.depth.png``, ``.label.png`` and
``.teacher.png`` / ``.teacher.npy`` where the root has them); ``shards.json``, written last, names every shard
with its ids in order, and records the root's classes, image size and folds (the sha256 of its
``folds.csv``). webdataset, not Hugging Face ``datasets``: its shards are plain POSIX tar files that any
tool reads and a stream reads strictly sequentially (one open file per shard, no index or Arrow cache to
build on the training machine), and it keeps each image's files as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.io import staged_folder, write_json
from kfold.data.layout import DataError, DataRoot, open_root
from kfold.splits import FOLDS_FILE, folds_sha256

INDEX = "shards.json"
FORMAT = "foldwise-shards/1"


@dataclass(frozen=True)
class Shard:
    """One tar file of the train split and the ids it holds, in order."""

    path: Path
    ids: tuple[str, ...]


@dataclass(frozen=True)
class ShardIndex:
    """What ``shards.json`` records: the shards and the root they were written from."""

    path: Path
    shards: tuple[Shard, ...]
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    has_depth: bool
    has_teacher: bool
    folds_sha256: str | None
    source: str

    @property
    def ids(self) -> list[str]:
        return [i for s in self.shards for i in s.ids]


def _sample_files(root: DataRoot, image_id: str) -> dict[str, Any]:
    """The webdataset sample of one train image: its files' bytes under their kind as extension."""
    sample: dict[str, Any] = {"__key__": image_id, "image.png": root.image_path("train", image_id).read_bytes(),
                              "label.png": root.label_path("train", image_id).read_bytes()}
    if root.has_depth:
        sample["depth.png"] = root.depth_path("train", image_id).read_bytes()
    if root.has_teacher:
        png, npy = root.teacher_dir / f"{image_id}.png", root.teacher_dir / f"{image_id}.npy"
        if png.is_file():
            sample["teacher.png"] = png.read_bytes()
        elif npy.is_file():
            sample["teacher.npy"] = npy.read_bytes()
        else:
            raise DataError(f"{png}: missing teacher depth for image {image_id!r}")
    return sample


def write_shards(root: DataRoot, out: Path, shard_size: int = 256, progress: bool | None = None) -> ShardIndex:
    """Write ``root``'s train split as shards of ``shard_size`` samples under ``out`` (through a staging folder:
    ``out`` appears whole or not at all) and return their index."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    ids = list(root.train_ids)
    dotted = next((i for i in ids if "." in i), None)
    if dotted is not None:  # webdataset splits a member's name into key and kind at the first dot
        raise DataError(f"{root.image_path('train', dotted)}: id {dotted!r} has a dot, which a webdataset key "
                        f"cannot hold; rename the image (and its depth and label)")
    groups = [ids[start : start + shard_size] for start in range(0, len(ids), shard_size)]
    record = {"format": FORMAT, "source": str(root.path), "classes": list(root.classes),
              "image_size": list(root.image_size), "has_depth": root.has_depth, "has_teacher": root.has_teacher,
              "folds_sha256": folds_sha256(root) if (root.path / FOLDS_FILE).is_file() else None, "shards": []}
    with staged_folder(out) as stage:
        bar = tqdm(total=len(ids), desc="shards", unit="img", disable=None if progress is None else not progress)
        for n, group in enumerate(groups):
            name = f"train-{n:06d}.tar"
            with wds.TarWriter(str(stage / name)) as sink:
                for image_id in group:
                    sink.write(_sample_files(root, image_id))
                    bar.update()
            record["shards"].append({"file": name, "ids": group})
        bar.close()
        write_json(stage / INDEX, record)
    return read_index(out)


def read_index(folder: str | Path) -> ShardIndex:
    """Open ``<folder>/shards.json``; a missing or malformed index, or a missing shard, is a one-line DataError."""
    folder = Path(folder)
    path = folder / INDEX
    if not path.is_file():
        raise DataError(f"{path}: missing; write the shards with python -m kfold.data.shards --data-root ROOT "
                        f"--out {folder}")
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {FORMAT!r}")
        shards = tuple(Shard(folder / s["file"], tuple(s["ids"])) for s in record["shards"])
        index = ShardIndex(folder, shards, tuple(record["classes"]), tuple(record["image_size"]),
                           bool(record["has_depth"]), bool(record["has_teacher"]), record["folds_sha256"],
                           record["source"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a shard index ({err})") from None
    missing = next((s.path for s in shards if not s.path.is_file()), None)
    if missing is not None:
        raise DataError(f"{missing}: missing shard listed in {path}")
    return index


def check_matches(index: ShardIndex, root: DataRoot, train_ids: Sequence[str]) -> None:
    """Raise a one-line DataError unless the shards hold ``root``'s classes, image size and these train ids."""
    where = index.path / INDEX
    if tuple(index.classes) != tuple(root.source_classes):
        raise DataError(f"{where}: classes {list(index.classes)} differ from {root.path}'s "
                        f"{list(root.source_classes)}")
    if tuple(index.image_size) != tuple(root.image_size):
        raise DataError(f"{where}: image size {tuple(index.image_size)} differs from {root.path}'s "
                        f"{tuple(root.image_size)}")
    have = set(index.ids)
    missing = [i for i in train_ids if i not in have]
    if missing:
        raise DataError(f"{where}: train id {missing[0]!r} of {root.path} is in no shard ({len(missing)} missing); "
                        f"write the shards again from this root")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m kfold.data.shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", "--data_root", dest="data_root", required=True, type=Path,
                   help="the dataset root to shard (its train split)")
    p.add_argument("--out", type=Path, default=None,
                   help="new folder for the shards and shards.json (default <data-root>/shards, where a "
                        "streamed run looks unless data.shards says otherwise)")
    p.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=256,
                   help="samples per shard (default 256; keep several shards per rank x loader worker)")
    args = p.parse_args(argv)
    args.out = args.out or args.data_root / "shards"
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        index = write_shards(open_root(args.data_root), args.out, args.shard_size)
        print(f"wrote {len(index.shards)} shards of up to {args.shard_size} samples ({len(index.ids)} train "
              f"images{', with teacher depths' if index.has_teacher else ''}) to {args.out}")

    return run_entry_point(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
