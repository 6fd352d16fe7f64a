"""Training of one fold: optimiser, warm-up + cosine, AMP, EMA, per-epoch validation, exact resume."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler
from tqdm import tqdm

from kfold.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
    write_metrics,
)
from kfold.config import Recipe
from kfold.data.dataset import SegmentationDataset
from kfold.data.layout import DataRoot
from kfold.data.transforms import EvalTransform, TrainTransform, derived_seed
from kfold.distributed import DistInfo, all_reduce_sum, broadcast_buffers
from kfold.losses import SegDepthLoss, parts_as_floats
from kfold.metrics import DepthMeter, confusion_matrix_torch, iou_per_class, mean_iou, pixel_accuracy
from kfold.models import amp_dtype, model_from_recipe
from kfold.store.teacher import TeacherTargets
from kfold.weights import init_from, write_init_report
from tta import split_output

if TYPE_CHECKING:
    from kfold.data.stream import ShardStream

log = logging.getLogger("kfold")
MAX_SKIPPED_STEPS = 20  # fp16 steps with a non-finite loss that one epoch may drop before the run stops
SYNC_EVERY = 16  # training steps between reads off the device (progress line, non-finite check)


class SeededSamples(torch.utils.data.Dataset):
    """Seeds the augmentation of every sample from (seed, epoch, index).

    Augmentations then do not depend on worker count or on where a run was resumed, which is what makes
    ``--resume`` reproduce an uninterrupted run exactly.
    """

    def __init__(self, dataset: SegmentationDataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        self.dataset.transform.reseed(derived_seed(self.seed, self.epoch, index))
        return self.dataset[index]


def build_loss(recipe: Recipe, classes: Sequence[str]) -> SegDepthLoss:
    """The recipe's loss; class weights are given by class name and must name real classes."""
    unknown = sorted(set(recipe.loss.class_weights) - set(classes))
    if unknown:
        raise ValueError(f"loss.class_weights: unknown class {unknown[0]!r}; classes are {', '.join(classes)}")
    weights = [recipe.loss.class_weights.get(name, 1.0) for name in classes]
    cfg = recipe.loss
    return SegDepthLoss(
        num_classes=len(classes), class_weights=weights if any(w != 1.0 for w in weights) else None,
        boundary_weight=cfg.boundary_weight, boundary_width=cfg.boundary_width, ohem_fraction=cfg.ohem_fraction,
        depth_loss=cfg.depth_loss if recipe.model.depth_head else "none", depth_weight=cfg.depth_weight,
        berhu_threshold=cfg.berhu_threshold, berhu_c=cfg.berhu_c,
        weighting=cfg.weighting, smoothness_weight=cfg.smoothness_weight,
        distill_alpha=recipe.distill.alpha, distill_temperature=recipe.distill.temperature)


def build_optimizer(model: nn.Module, loss_fn: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW or SGD with two parameter groups: the encoder (lr x encoder_lr_scale) and the rest."""
    cfg = recipe.optim
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    rest = [p for p in model.parameters() if id(p) not in encoder_ids] + list(loss_fn.parameters())
    groups = [{"params": list(model.encoder.parameters()), "lr": cfg.lr * cfg.encoder_lr_scale, "name": "encoder"},
              {"params": rest, "lr": cfg.lr, "name": "decoder"}]
    # Fused kernels do the whole update in one pass instead of one kernel per tensor list; on CPU the
    # foreach step is a large share of a small model's training step (bench/bench_train_loop.py).
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0, fused=fused)
    raise ValueError(f"optim.name: unknown optimiser {cfg.name!r}; choose adamw or sgd")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, warmup_ratio: float, min_ratio: float) -> float:
    """The lr multiplier at ``step``: linear from ``warmup_ratio`` to 1, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WithPseudoLabels(ConcatDataset):
    """Fold k's training images, then the test images pseudo-labelled by the fold-k teacher (one transform, so
    :class:`SeededSamples` seeds both)."""

    def __init__(self, train_set: SegmentationDataset, test_set: SegmentationDataset) -> None:
        super().__init__([train_set, test_set])
        self.transform = train_set.transform


@dataclass
class FoldData:
    train_loader: DataLoader
    val_loader: DataLoader
    train_samples: SeededSamples
    stream: ShardStream | None = None  # data.streaming: the training batches come from here


def build_loaders(recipe: Recipe, root: DataRoot, train_ids: Sequence[str], val_ids: Sequence[str],
                  dist: DistInfo, teacher: TeacherTargets | None = None) -> FoldData:
    """Training loader (DistributedSampler under torchrun) and this rank's unpadded share of validation.

    ``teacher``: the fold's teacher targets (distillation); with ``distill.pseudo_test`` the test images join
    the training set with the teacher's pseudo-labels.
    """
    d = recipe.data
    transform = TrainTransform(d.input_size, d.crop_size, hflip=d.hflip, scale_limit=d.scale_limit,
                               rotate_limit=d.rotate_limit, color_jitter=d.color_jitter)
    train_set: SegmentationDataset | WithPseudoLabels = SegmentationDataset(
        root, "train", train_ids, in_channels=d.in_channels, depth_target=recipe.loss.depth_target,
        transform=transform, teacher=teacher)
    if teacher is not None and recipe.distill.pseudo_test:
        pseudo = SegmentationDataset(root, "test", teacher.ids("test"), transform, d.in_channels, with_labels=False,
                                     teacher=teacher, min_confidence=recipe.distill.min_confidence)
        train_set = WithPseudoLabels(train_set, pseudo)
        log.info("distill.pseudo_test: %d test images pseudo-labelled by the fold-%d teacher join the training set",
                 len(pseudo), teacher.fold)
    samples = SeededSamples(train_set, recipe.train.seed)
    sampler = DistributedSampler(samples, dist.world_size, dist.rank, shuffle=True, seed=recipe.train.seed,
                                 drop_last=True) if dist.enabled else None
    generator = torch.Generator().manual_seed(recipe.train.seed)
    per_rank_batch = max(1, recipe.train.batch_size // dist.world_size)
    train_loader = DataLoader(samples, batch_size=per_rank_batch, shuffle=sampler is None, sampler=sampler,
                              generator=generator, num_workers=d.num_workers, drop_last=True,
                              pin_memory=dist.device.type == "cuda", persistent_workers=False)
    # Each rank validates a disjoint slice, so every image counts exactly once (a DistributedSampler
    # would pad by repeating images and bias the metrics).
    val_share = list(val_ids)[dist.rank::dist.world_size]
    val_set = SegmentationDataset(root, "train", val_share, in_channels=d.in_channels,
                                  transform=EvalTransform(d.input_size))
    val_loader = DataLoader(val_set, batch_size=recipe.oof.batch_size, num_workers=d.num_workers)
    stream = None
    if d.streaming:  # webdataset: imported only by streamed runs
        from kfold.data.shards import check_matches, read_index
        from kfold.data.stream import ShardStream

        index = read_index(d.shards or root.path / "shards")
        check_matches(index, root, train_ids)
        stream = ShardStream(index, train_set, recipe.train.seed, per_rank_batch, d.buffer_batches, dist.rank,
                             dist.world_size, d.num_workers)
        log.info("data.streaming: %d shards from %s, shuffle buffer %d batches of %d per worker",
                 len(index.shards), index.path, d.buffer_batches, per_rank_batch)
    return FoldData(train_loader, val_loader, samples, stream)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
             autocast: torch.dtype | None, show: bool = False) -> dict[str, float | list[float]]:
    """mIoU, pixel accuracy, per-class IoU and depth metrics at full label resolution, summed over ranks.

    ``show``: a tqdm bar (on a terminal) with this rank's running mIoU.
    """
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    depth_meter = DepthMeter(device)
    bar = tqdm(loader, desc="validate", leave=False, disable=None if show else True, dynamic_ncols=True)
    for batch in bar:
        image, label = batch["image"].to(device), batch["label"].to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            seg, depth = split_output(model(image))
        seg = nn.functional.interpolate(seg.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        cm += confusion_matrix_torch(label, seg.argmax(1), num_classes, check=False)  # labels checked when read
        if depth is not None:
            depth_meter.update(depth.float(), batch["depth"].to(device))
        if not bar.disable:
            bar.set_postfix(miou=f"{mean_iou(cm):.4f}")
    all_reduce_sum(cm)
    all_reduce_sum(depth_meter.state)
    metrics: dict[str, float | list[float]] = {"miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm),
                                               "iou": iou_per_class(cm).tolist()}
    if depth_meter.state[0] > 0:
        metrics.update({f"depth_{k}": v for k, v in depth_meter.compute().items()})
    return metrics


def train_steps(model: nn.Module, train_model: nn.Module, ema: ModelEmaV3, loss_fn: SegDepthLoss,
                optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler | None,
                batches: Iterable[dict], steps: int, recipe: Recipe, stretch: str, frozen: bool,
                device: torch.device, autocast: torch.dtype | None, show: bool) -> dict[str, float]:
    """``steps`` optimiser steps on ``batches`` (an epoch's loader, or a stretch of the iteration stream);
    returns the mean of each loss part. ``stretch`` names it in errors and the progress bar.

    Nothing in a step reads a number off the device (each read waits for the GPU to drain): the loss parts
    are summed where they are, and a non-finite loss is noted there too and checked every ``SYNC_EVERY``
    steps and at the end, before any checkpoint is written. Under fp16 the gradient scaler reads its
    overflow flag every step anyway, so there the loss is checked every step and a bad step is dropped.
    """
    train_model.train()
    if frozen:
        model.encoder.eval()  # frozen means frozen: no BatchNorm statistics drift either
    sums: dict[str, torch.Tensor] = {}
    watch = NonFiniteWatch(device)
    start, seen, skipped = time.perf_counter(), 0, 0
    bar = tqdm(batches, total=steps, desc=stretch, leave=False, disable=None if show else True, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        if step >= steps:
            break
        image, label, depth = (batch[k].to(device, non_blocking=True) for k in ("image", "label", "depth"))
        soft = batch["soft"].to(device, non_blocking=True) if "soft" in batch else None
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            seg, depth_pred = split_output(train_model(image))
        loss, parts = loss_fn(seg.float(), None if depth_pred is None else depth_pred.float(), label, depth, image,
                              soft)
        if scaler is not None and not torch.isfinite(loss):
            if skipped >= MAX_SKIPPED_STEPS:
                raise FloatingPointError(f"loss is {loss.item()} at {stretch}, step {step + 1}; "
                                         "the last good checkpoint is last.pt")
            # fp16: the scaler lowers its scale and the step is dropped; nothing else may advance either.
            skipped += 1
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            continue
        watch.note(loss.detach(), step)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if recipe.optim.grad_clip:
            if scaler:
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        ema.update(model, step=scheduler.last_epoch)
        for key, value in parts.items():
            sums[key] = sums[key] + value if key in sums else value
        seen += image.shape[0]
        if (step + 1) % SYNC_EVERY == 0:
            watch.check(stretch)
            if not bar.disable:
                bar.set_postfix(loss=f"{float(parts['total']):.3f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}",
                                img_s=f"{seen / (time.perf_counter() - start):.1f}")
    watch.check(stretch)
    means = {f"train_{k}": v / max(1, steps - skipped) for k, v in parts_as_floats(sums).items()} if sums else {}
    means["skipped_steps"] = skipped
    means["images_per_s"] = seen / (time.perf_counter() - start)
    return means


class NonFiniteWatch:
    """Notes, on the device, the first step whose loss is not finite; :meth:`check` raises for it.

    Args:
        device: where the losses are.
    """

    def __init__(self, device: torch.device) -> None:
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def note(self, loss: torch.Tensor, step: int) -> None:
        new = ~torch.isfinite(loss) & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.value = torch.where(new, loss.float(), self.value)

    def check(self, stretch: str) -> None:
        """Raise FloatingPointError naming the stretch, step and value of the first non-finite loss, if any."""
        first_step, value = int(self.first_step), float(self.value)  # the one read off the device
        if first_step >= 0:
            raise FloatingPointError(f"loss is {value} at {stretch}, step {first_step + 1}; "
                                     "the last good checkpoint is last.pt")


class EpochPlan:
    """The run as epochs: each stretch between evaluations is one pass of the training loader."""

    def __init__(self, recipe: Recipe, data: FoldData) -> None:
        self.recipe, self.data = recipe, data
        loader, cfg = data.train_loader, recipe.train
        # A streamed epoch is as many steps as a map-style one; the passes of the stream run on across epochs.
        self.steps_per_stretch = min(len(loader), cfg.max_steps_per_epoch or len(loader))
        self.stretches = recipe.schedule.epochs
        self.total_steps = self.steps_per_stretch * recipe.schedule.epochs
        self.warmup_steps = self.steps_per_stretch * recipe.schedule.warmup_epochs

    def batches(self, i: int) -> tuple[Iterable[dict], int]:
        """Stretch ``i``'s batches and step count (seeded by (seed, epoch): exact resumes)."""
        if self.data.stream is not None:
            n = self.steps_per_stretch
            return self.data.stream.steps(i * n, (i + 1) * n, self.data.train_loader.pin_memory), n
        seed, loader = self.recipe.train.seed, self.data.train_loader
        self.data.train_samples.epoch = i
        loader.generator.manual_seed(derived_seed(seed, i, 1))
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(i)
        return loader, self.steps_per_stretch

    def position(self, i: int) -> dict[str, int]:
        return {"epoch": i + 1}

    def label(self, i: int) -> str:
        return f"epoch {i + 1}"

    def done(self, stretches: int) -> str:
        """Where a run stands after ``stretches`` stretches, for the log."""
        return f"epoch {stretches}/{self.stretches}"

    def checkpoint_at(self, i: int) -> bool:
        return True


class IterationPlan:
    """The run as ``schedule.iterations`` steps on an endless stream of passes over the training ids, evaluated
    every ``train.eval_every`` and checkpointed every ``train.checkpoint_every`` iterations.

    Pass p visits the ids in an order seeded by (seed, p) (under DDP: this rank's share), so the stream
    position (pass, batch) of any iteration is known and a resumed run reads on from there, augmentations
    included, without loading the batches it skips.
    """

    def __init__(self, recipe: Recipe, data: FoldData, dist: DistInfo) -> None:
        self.recipe, self.data, self.dist = recipe, data, dist
        s, cfg = recipe.schedule, recipe.train
        self.total_steps, self.warmup_steps = s.iterations, s.warmup_iterations
        self.every = cfg.eval_every or s.iterations
        self.checkpoint_every = cfg.checkpoint_every or self.every
        self.stretches = math.ceil(s.iterations / self.every)
        self.batch = data.train_loader.batch_size or 1
        n = len(data.train_samples) // dist.world_size if dist.enabled else len(data.train_samples)
        self.per_pass = max(1, n // self.batch)

    def _order(self, p: int) -> list[int]:
        seed, samples = self.recipe.train.seed, self.data.train_samples
        if self.dist.enabled:
            sampler = DistributedSampler(samples, self.dist.world_size, self.dist.rank, shuffle=True, seed=seed,
                                         drop_last=True)
            sampler.set_epoch(p)
            return list(sampler)
        return torch.randperm(len(samples), generator=torch.Generator().manual_seed(derived_seed(seed, p, 1))).tolist()

    def _stream(self, start: int, stop: int) -> Iterator[dict]:
        loader = self.data.train_loader
        while start < stop:
            p, offset = divmod(start, self.per_pass)
            take = min(self.per_pass - offset, stop - start)
            order = self._order(p)
            self.data.train_samples.epoch = p
            batches = [order[b * self.batch : (b + 1) * self.batch] for b in range(offset, offset + take)]
            yield from DataLoader(self.data.train_samples, batch_sampler=batches, num_workers=loader.num_workers,
                                  pin_memory=loader.pin_memory)
            start += take

    def batches(self, i: int) -> tuple[Iterable[dict], int]:
        start, stop = i * self.every, min((i + 1) * self.every, self.total_steps)
        if self.data.stream is not None:
            return self.data.stream.steps(start, stop, self.data.train_loader.pin_memory), stop - start
        return self._stream(start, stop), stop - start

    def position(self, i: int) -> dict[str, int]:
        stop = min((i + 1) * self.every, self.total_steps)
        return {"iteration": stop, "epoch": math.ceil(stop / self.per_pass)}

    def label(self, i: int) -> str:
        return f"iterations {i * self.every + 1}-{self.position(i)['iteration']}"

    def done(self, stretches: int) -> str:
        """Where a run stands after ``stretches`` stretches, for the log."""
        return f"iteration {min(stretches * self.every, self.total_steps)}/{self.total_steps}"

    def checkpoint_at(self, i: int) -> bool:
        stop = self.position(i)["iteration"]
        return stop % self.checkpoint_every == 0 or stop == self.total_steps


def fit_fold(recipe: Recipe, root: DataRoot, run_dir: Path, train_ids: Sequence[str], val_ids: Sequence[str],
             dist: DistInfo, resume: bool = False, weights_path: str | None = None,
             on_row: Callable[[dict], None] | None = None, teacher: TeacherTargets | None = None) -> list[dict]:
    """Train one fold and write ``metrics.csv``, ``last.pt`` and ``model.safetensors`` (EMA).

    Epoch recipes validate and checkpoint every epoch; ``schedule.unit iterations`` every ``train.eval_every``
    and ``train.checkpoint_every`` iterations (see :class:`IterationPlan`).

    Args:
        recipe: the resolved recipe.
        root: the dataset root.
        run_dir: ``runs/<experiment>/fold<k>``.
        train_ids, val_ids: this fold's training and validation image ids.
        dist: process-group facts (a single process when not under torchrun).
        resume: continue from ``run_dir/last.pt`` when it exists.
        weights_path: initial weights (safetensors or checkpoint); ignored when resuming.
        on_row: called on the main process with each metrics row as it is made (the trackers' mirror).
        teacher: the fold's teacher targets when the recipe distils (``distill.teacher``).

    Returns:
        One metrics row per evaluation.
    """
    device, cfg = dist.device, recipe.train
    torch.manual_seed(cfg.seed)
    model = fold_model(recipe, root, run_dir, dist, weights_path)
    loss_fn = build_loss(recipe, root.classes).to(device)
    optimizer = build_optimizer(model, loss_fn, recipe)
    data = build_loaders(recipe, root, train_ids, val_ids, dist, teacher)
    plan = IterationPlan(recipe, data, dist) if recipe.schedule.unit == "iterations" else EpochPlan(recipe, data)
    s = recipe.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        warmup_cosine, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps,
        warmup_ratio=s.warmup_lr_ratio, min_ratio=s.min_lr_ratio))
    autocast = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
    log.info("device %s, autocast %s, gradient scaler %s, pinned batches %s", device,
             str(autocast).removeprefix("torch.") if autocast else "off (float32)", "on" if scaler else "off",
             "on" if data.train_loader.pin_memory else "off")
    rows, start, best_miou = [], 0, -math.inf
    if resume and (run_dir / "last.pt").exists():
        start, best_miou, rows = restore(run_dir / "last.pt", device, model, ema, loss_fn, optimizer, scheduler,
                                         scaler)
        log.info("resumed %s at %s", run_dir, plan.done(start))
    train_model: nn.Module = model
    for i in range(start, plan.stretches):
        frozen = i < recipe.optim.freeze_encoder_epochs
        for param in model.encoder.parameters():
            param.requires_grad_(not frozen)
        if dist.enabled and (i == start or i == recipe.optim.freeze_encoder_epochs):
            # DDP fixes its set of trainable parameters when wrapped: wrap again when freezing changes.
            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(derived_seed(cfg.seed, i, 0))
        batches, steps = plan.batches(i)
        stats = train_steps(model, train_model, ema, loss_fn, optimizer, scheduler, scaler, batches, steps, recipe,
                            plan.label(i), frozen, device, autocast, show=dist.is_main)
        broadcast_buffers(ema.module)
        val = evaluate(ema.module, data.val_loader, root.num_classes, device, autocast, show=dist.is_main)
        row = {**plan.position(i), "lr": optimizer.param_groups[-1]["lr"], **stats,
               "val_miou": val.pop("miou"), "val_pixel_acc": val.pop("pixel_acc"),
               **{f"val_{k}": v for k, v in val.items() if k != "iou"},
               **{f"iou_{name}": iou for name, iou in zip(root.classes, val["iou"])}}
        rows.append(row)
        improved = row["val_miou"] > best_miou
        best_miou = max(best_miou, row["val_miou"])
        if dist.is_main:
            log.info("%s loss %.4f val mIoU %.4f pixel acc %.4f (%.1f img/s)", plan.done(i + 1),
                     row.get("train_total", float("nan")), row["val_miou"], row["val_pixel_acc"], row["images_per_s"])
            if cfg.select == "best" and improved:
                save_weights(run_dir / "best.safetensors", ema.module, {"epoch": str(i + 1)})
            if plan.checkpoint_at(i):
                save_checkpoint(run_dir / "last.pt", model=model.state_dict(), ema=ema.module.state_dict(),
                                loss=loss_fn.state_dict(), optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else {},
                                epoch=i + 1, best_miou=best_miou, rows=rows, rng=rng_state())
                write_metrics(run_dir / "metrics.csv", rows)  # after last.pt: never ahead of what can resume
            if on_row is not None:
                on_row(row)
    if dist.is_main:
        finalize_weights(run_dir, ema.module, cfg.select, rows)
    return rows


def fold_model(recipe: Recipe, root: DataRoot, run_dir: Path, dist: DistInfo, weights_path: str | None
               ) -> nn.Module:
    """The recipe's model on the device: initial weights from ``weights_path`` (keys renamed by
    ``model.init_key_map``, loaded non-strict, ``init_report.txt``), SyncBatchNorm when asked for."""
    model = model_from_recipe(recipe, root.num_classes).to(dist.device)
    if weights_path:
        report = init_from(model, weights_path, recipe.model.init_key_map)
        if dist.is_main:
            write_init_report(run_dir, report)
        log.info("%s (init_report.txt lists the rest)", report.text().splitlines()[0])
    return convert_sync_bn(model, recipe.model.sync_bn, dist)


def convert_sync_bn(model: nn.Module, sync_bn: bool, dist: DistInfo) -> nn.Module:
    """``model.sync_bn``: BatchNorm -> SyncBatchNorm under DDP (statistics over the global batch)."""
    if not sync_bn:
        return model
    if not dist.enabled:
        log.info("model.sync_bn: single process, BatchNorm kept (SyncBatchNorm only matters under torchrun)")
        return model
    if dist.device.type != "cuda":  # torch's SyncBatchNorm refuses CPU tensors
        log.info("model.sync_bn: SyncBatchNorm needs CUDA; per-process BatchNorm kept on %s", dist.device.type)
        return model
    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.info("model.sync_bn: %d BatchNorm layers converted to SyncBatchNorm", n)
    return model


def restore(path: Path, device: torch.device, model: nn.Module, ema: ModelEmaV3, loss_fn: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
            scaler: torch.amp.GradScaler | None) -> tuple[int, float, list[dict]]:
    """Load ``last.pt`` into the training state, RNG included; return (epochs done, best mIoU, metrics rows)."""
    state = load_checkpoint(path, device)
    model.load_state_dict(state["model"])
    ema.module.load_state_dict(state["ema"])
    loss_fn.load_state_dict(state["loss"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["epoch"], state["best_miou"], list(state["rows"])


def finalize_weights(run_dir: Path, ema_model: nn.Module, select: str, rows: list[dict]) -> None:
    """Write ``model.safetensors``: the last EMA weights, or the best epoch's when the recipe opts in."""
    if select == "best" and (run_dir / "best.safetensors").exists():
        (run_dir / "best.safetensors").replace(run_dir / "model.safetensors")
        return
    save_weights(run_dir / "model.safetensors", ema_model, {"epoch": str(len(rows)), "select": "last"})
