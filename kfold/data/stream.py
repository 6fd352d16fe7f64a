"""Training batches streamed from webdataset shards through a shuffle buffer, exactly once per pass.

Pass p of the stream: the shards in an order seeded by (seed, p), dealt to the DDP ranks (``[rank::world]``)
and then to the DataLoader workers (``[worker::workers]``), as ``wds.split_by_node`` and
``wds.split_by_worker`` deal them; each worker reads its shards in turn, drops the fold's validation ids
(``wds.select``) and shuffles through a buffer of ``buffer_batches`` x batch samples (``wds.shuffle``, seeded
by (seed, p, rank, worker)). Every sample of a shard reaches one worker of one rank, so a pass yields each
training id exactly once; memory holds at most the buffer (of undecoded samples) per worker.

The DataLoader returns the workers' batches round by round (worker 0, 1, ... then again), skipping workers
that ran out; the index of every shard's ids makes that order computable, so a resumed run skips to
its batch's round without decoding what it skips (at most workers - 1 batches of that round are decoded
and dropped), and reads on exactly as the uninterrupted run did. Passes follow
each other without a break: a rank takes as many steps as the schedule asks, whatever its pass length, so
ranks never wait on each other at a pass's end.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kfold.data.dataset import SegmentationDataset
from kfold.data.layout import read_depth, read_label, read_rgb
from kfold.data.shards import ShardIndex
from kfold.data.transforms import derived_seed


def _named(data: bytes, name: str) -> io.BytesIO:
    """An in-memory file that error messages name (``<shard>:<id>.<kind>``)."""
    buffer = io.BytesIO(data)
    buffer.name = name
    return buffer


class ShardStream(IterableDataset):
    """One rank's share of a pass over the shards, as items of ``dataset`` (decoded and augmented as it does).

    Args:
        index: the shards.
        dataset: the fold's training :class:`SegmentationDataset` (its ids are the ids streamed; the others,
            e.g. the validation fold, are dropped from the stream).
        seed: the run's seed (shard order, buffer shuffle and augmentation, per pass).
        batch: this rank's batch size.
        buffer_batches: shuffle buffer, in batches.
        rank / world: this process's DDP rank and the number of ranks.
        workers: DataLoader worker processes (0 = read in this process).
    """

    def __init__(self, index: ShardIndex, dataset: SegmentationDataset, seed: int, batch: int, buffer_batches: int,
                 rank: int = 0, world: int = 1, workers: int = 0) -> None:
        self.index, self.dataset, self.seed, self.batch = index, dataset, seed, batch
        self.buffer = max(1, buffer_batches * batch)
        self.rank, self.world, self.workers = rank, world, workers
        self.position = {image_id: i for i, image_id in enumerate(dataset.ids)}
        self.counts = [sum(i in self.position for i in shard.ids) for shard in index.shards]
        self.pass_index, self.skip = 0, [0] * max(1, workers)

    def worker_shards(self, p: int, worker: int) -> list[int]:
        """Indices of the shards worker ``worker`` of this rank reads in pass ``p``."""
        order = np.random.default_rng(derived_seed(self.seed, p, 2)).permutation(len(self.index.shards)).tolist()
        return order[self.rank :: self.world][worker :: max(1, self.workers)]

    def batch_order(self, p: int) -> list[int]:
        """The worker of each batch of pass ``p`` in the order the DataLoader returns them."""
        per_worker = [math.ceil(sum(self.counts[s] for s in self.worker_shards(p, w)) / self.batch)
                      for w in range(max(1, self.workers))]
        rounds = max(per_worker, default=0)
        return [w for k in range(rounds) for w, n in enumerate(per_worker) if k < n]

    def pipeline(self, p: int, worker: int) -> wds.DataPipeline:
        """Worker ``worker``'s undecoded samples of pass ``p``: its shards, this fold's ids, shuffled."""
        urls = [str(self.index.shards[s].path) for s in self.worker_shards(p, worker)]
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(),
            wds.select(lambda sample: sample["__key__"] in self.position),
            wds.shuffle(self.buffer, initial=self.buffer, seed=derived_seed(self.seed, p, self.rank, worker)),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, p = (info.id if info is not None else 0), self.pass_index
        for sample in itertools.islice(self.pipeline(p, worker), self.skip[worker] * self.batch, None):
            yield self.decode(sample, p)

    def decode(self, sample: dict[str, Any], p: int) -> dict[str, Any]:
        """A streamed sample as the dataset's item (augmentation seeded by (seed, pass, id's position))."""
        ds, image_id = self.dataset, sample["__key__"]
        where = f"{sample.get('__url__', self.index.path)}:{image_id}"
        image = read_rgb(_named(sample["image.png"], f"{where}.image.png"))
        depth = read_depth(_named(sample["depth.png"], f"{where}.depth.png")) if "depth.png" in sample else None
        label = read_label(_named(sample["label.png"], f"{where}.label.png"), len(ds.root.source_classes))
        if ds.root.class_map:
            label = ds.root.class_map.apply(label)
        names = {k: f"{where}.{k}.png" for k in ("image", "depth", "label")}
        image, depth, label = ds.checked(image_id, image, depth, label, names)
        index = self.position[image_id]
        teacher = None
        if ds.depth_target != "sensor":
            teacher = (read_depth(_named(sample["teacher.png"], f"{where}.teacher.png")) if "teacher.png" in sample
                       else np.load(io.BytesIO(sample["teacher.npy"]), allow_pickle=False).astype(np.float32))
        ds.transform.reseed(derived_seed(self.seed, p, index))
        return ds.item(index, image, depth, label, ds.target_depth(index, depth, teacher))

    def steps(self, start: int, stop: int, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
        """Batches ``start`` .. ``stop - 1`` of this rank's endless stream of passes."""
        p, first = 0, 0
        while start < stop:
            order = self.batch_order(p)
            if not order:
                raise ValueError(f"{self.index.path}: no training sample of this fold is in rank {self.rank}'s shards")
            if start >= first + len(order):  # this pass ends before `start`: skip it without reading
                p, first = p + 1, first + len(order)
                continue
            offset = start - first
            # The loader starts every pass at worker 0: the workers skip (undecoded) the rounds before the
            # one holding `offset`, and the batches of that round before it are dropped here.
            rounds = [order[:i].count(w) for i, w in enumerate(order)]
            round_start = rounds.index(rounds[offset])
            self.pass_index = p
            self.skip = [order[:round_start].count(w) for w in range(max(1, self.workers))]
            take = min(len(order) - offset, stop - start)
            drop = offset - round_start
            loader = DataLoader(self, batch_size=self.batch, num_workers=self.workers, pin_memory=pin_memory)
            yield from itertools.islice(loader, drop, drop + take)
            start += take
            p, first = p + 1, first + len(order)


def stream_ids(stream: ShardStream, p: int) -> list[list[str]]:
    """The ids of every batch of pass ``p``, in the order :meth:`ShardStream.steps` yields them, read from the
    shards without decoding (a check of the stream, used by the tests)."""
    per_worker = []
    for worker in range(max(1, stream.workers)):
        keys = [sample["__key__"] for sample in stream.pipeline(p, worker)]
        per_worker.append(iter([keys[i : i + stream.batch] for i in range(0, len(keys), stream.batch)]))
    return [next(per_worker[w]) for w in stream.batch_order(p)]
