"""Data pipeline: images/s of the training Dataset (augmentations on) with 0 and 2 workers, against decoding
the PNGs alone; and the streamed loader (webdataset shards through a shuffle buffer) against the map-style one.

The data is a synthetic root (``kfold.data.synthetic.generate``). The Dataset is built as
``kfold.train.build_loaders`` builds it: ``SegmentationDataset`` with ``TrainTransform`` (resize,
scale/rotate, crop, flip, colour jitter), wrapped in ``SeededSamples``. The reference decodes each image's
RGB, depth and label PNGs with ``kfold.data.layout`` and does nothing else. With workers, the second epoch
of a loader with persistent workers is timed (worker start-up excluded).

The streamed side is ``kfold.data.stream.ShardStream`` on shards written by ``kfold.data.shards`` (32 images
each), with the same Dataset and augmentations, timed over one pass including its loader's start-up (a
stream makes a loader per pass); the map-style side here is the same pass, start-up included too.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import best_time, make_root, parse_args, pick, result
from torch.utils.data import DataLoader

from kfold.data.dataset import SegmentationDataset
from kfold.data.layout import open_root, read_depth, read_label, read_rgb
from kfold.data.shards import write_shards
from kfold.data.stream import ShardStream
from kfold.data.transforms import TrainTransform
from kfold.train import SeededSamples


def loader_rate(dataset: SeededSamples, workers: int, batch: int) -> float:
    """Images/s of the second pass over a DataLoader (the first one starts the workers)."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=False,
                        persistent_workers=workers > 0)
    best = float("inf")
    for epoch in range(2):
        dataset.epoch = epoch
        t0 = time.perf_counter()
        for _ in loader:
            pass
        if epoch > 0 or workers == 0:
            best = min(best, time.perf_counter() - t0)
    return len(dataset) / best


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    n, size, crop = pick(args.mode, (200, (480, 640), (384, 512)), (48, (240, 320), (192, 256)),
                         (8, (32, 48), (32, 32)))
    batch = pick(args.mode, 8, 8, 4)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = open_root(make_root(Path(tmp) / "root", n, size, k=None))
        ids = list(root.train_ids)

        def decode() -> None:
            for i in ids:
                read_rgb(root.image_path("train", i))
                read_depth(root.depth_path("train", i))
                read_label(root.label_path("train", i), root.num_classes)

        t_decode, _ = best_time(decode, 2)
        transform = TrainTransform(size, crop)
        dataset = SeededSamples(SegmentationDataset(root, "train", ids, transform, in_channels=4), seed=0)
        decode_rate = n / t_decode
        shape = f"{size[0]}x{size[1]} -> crop {crop[0]}x{crop[1]}"
        for workers in (0, 2):
            rate = loader_rate(dataset, workers, batch)
            result("data", f"{workers} workers, {shape}", f"{rate:.1f} img/s", "png-decode",
                   f"{decode_rate:.1f} img/s", rate / decode_rate, images=n, batch=batch, in_channels=4)
        index = write_shards(root, Path(tmp) / "shards", shard_size=pick(args.mode, 32, 8, 2), progress=False)
        for workers in (0, 2):
            stream = ShardStream(index, dataset.dataset, seed=0, batch=batch, buffer_batches=4, workers=workers)
            passes = len(stream.batch_order(0))
            t_stream, _ = best_time(lambda s=stream, n=passes: sum(1 for _ in s.steps(0, n)), 2)
            loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
            t_map, _ = best_time(lambda ld=loader: sum(1 for _ in ld), 2)
            result("data", f"streamed, {workers} workers, {shape}", f"{n / t_stream:.1f} img/s", "map-style",
                   f"{n / t_map:.1f} img/s", t_map / t_stream, images=n, batch=batch, shards=len(index.shards),
                   buffer_batches=4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
