"""Training-loop overhead: ``kfold.train.train_steps`` (EMA, loss parts, progress, lr schedule) plus the
per-epoch tail of ``fit_fold`` (log line, ``metrics.csv``, ``last.pt``) against a bare PyTorch loop.

Both sides train the same model (smp FPN, resnet18, depth head; a fresh copy each) with the same
``SegDepthLoss``, optimiser and lr schedule on identical pre-made batches, so the difference is the loop's
own bookkeeping. Validation is left out of both (it is work, not overhead). Epochs are interleaved (ours,
bare, ours, ...) and the fastest epoch of each side counts, because other processes only ever add time.
A last figure times one step of the optimiser ``build_optimizer`` makes (fused AdamW) against torch's
default foreach AdamW on the same parameters.
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from common import best_time, fmt_s, parse_args, pick, result
from timm.utils import ModelEmaV3

from kfold.checkpoint import rng_state, save_checkpoint, write_metrics
from kfold.config import build_recipe
from kfold.data.layout import DEFAULT_CLASSES
from kfold.models import build_model
from kfold.train import build_loss, build_optimizer, train_steps, warmup_cosine
from tta import split_output

log = logging.getLogger("kfold")


def make_batches(n: int, batch: int, size: tuple[int, int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches shaped like the dataset's (image, label with some 255s, depth in metres)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.randint(0, 13, (batch, *size), generator=g)
        label[torch.rand(batch, *size, generator=g) < 0.05] = 255
        out.append({"image": torch.randn(batch, 3, *size, generator=g), "label": label,
                    "depth": torch.rand(batch, 1, *size, generator=g) * 5})
    return out


class Side:
    """A model, its loss, optimiser and schedule: one side of the comparison."""

    def __init__(self, model: torch.nn.Module, recipe, steps_per_epoch: int, epochs: int):
        self.model = copy.deepcopy(model)
        self.loss_fn = build_loss(recipe, DEFAULT_CLASSES)
        self.optimizer = build_optimizer(self.model, self.loss_fn, recipe)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            warmup_cosine, total_steps=steps_per_epoch * epochs, warmup_steps=steps_per_epoch,
            warmup_ratio=0.01, min_ratio=0.0))
        self.ema = ModelEmaV3(self.model, decay=recipe.train.ema_decay)
        self.rows: list[dict] = []


def ours_epoch(side: Side, batches: list, recipe, epoch: int, run_dir: Path) -> tuple[float, float]:
    """(seconds of the steps, seconds of the per-epoch tail: log, metrics.csv, last.pt)."""
    t0 = time.perf_counter()
    stats = train_steps(side.model, side.model, side.ema, side.loss_fn, side.optimizer, side.scheduler, None,
                        batches, len(batches), recipe, f"epoch {epoch + 1}", False, torch.device("cpu"), None,
                        show=False)
    t1 = time.perf_counter()
    row = {"epoch": epoch + 1, "lr": side.optimizer.param_groups[-1]["lr"], **stats}
    side.rows.append(row)
    log.info("epoch %d loss %.4f (%.1f img/s)", epoch + 1, row["train_total"], row["images_per_s"])
    write_metrics(run_dir / "metrics.csv", side.rows)
    save_checkpoint(run_dir / "last.pt", model=side.model.state_dict(), ema=side.ema.module.state_dict(),
                    loss=side.loss_fn.state_dict(), optimizer=side.optimizer.state_dict(),
                    scheduler=side.scheduler.state_dict(), scaler={}, epoch=epoch + 1, best_miou=0.0,
                    rows=side.rows, rng=rng_state())
    return t1 - t0, time.perf_counter() - t1


def bare_epoch(side: Side, batches: list) -> float:
    """Seconds of a bare loop: forward, the same loss, backward, step, schedule."""
    t0 = time.perf_counter()
    side.model.train()
    for batch in batches:
        seg, depth_pred = split_output(side.model(batch["image"]))
        loss, _ = side.loss_fn(seg, depth_pred, batch["label"], batch["depth"], batch["image"])
        side.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        side.optimizer.step()
        side.scheduler.step()
    return time.perf_counter() - t0


def optimizer_step_times(model: torch.nn.Module, recipe, repeat: int) -> tuple[float, float]:
    """(fused, foreach) seconds of one AdamW step over the model's parameters, random gradients."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    times = []
    for fused in (True, False):
        opt = torch.optim.AdamW(params, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay, fused=fused,
                                foreach=None if fused else True)
        opt.step()  # state allocation
        times.append(best_time(opt.step, repeat)[0])
    return times[0], times[1]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    size, batch, steps, epochs = pick(args.mode, ((128, 160), 8, 20, 4), ((96, 128), 8, 5, 3), ((32, 32), 2, 1, 2))
    recipe = build_recipe({"schedule.epochs": epochs}, "demo")
    torch.manual_seed(0)
    model = build_model("fpn", "resnet18", None, 3, 13, depth_head=True)
    batches = make_batches(steps, batch, size)
    ours, bare = Side(model, recipe, steps, epochs), Side(model, recipe, steps, epochs)
    bare_epoch(bare, batches[:1])  # warm-up of both sides (allocator, oneDNN kernels)
    train_steps(ours.model, ours.model, ours.ema, ours.loss_fn, ours.optimizer, ours.scheduler, None,
                batches[:1], 1, recipe, "epoch 1", False, torch.device("cpu"), None, show=False)
    t_ours, t_tail, t_bare = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for epoch in range(epochs):
            steps_s, tail_s = ours_epoch(ours, batches, recipe, epoch, Path(tmp))
            t_ours.append(steps_s)
            t_tail.append(tail_s)
            t_bare.append(bare_epoch(bare, batches))
        ckpt_mb = (Path(tmp) / "last.pt").stat().st_size / 2**20
    step_ours, step_bare = min(t_ours) / steps, min(t_bare) / steps
    tail = min(t_tail)
    shape = f"batch {batch} x {size[0]}x{size[1]}"
    result("train", f"per step, {shape}", fmt_s(step_ours), "bare", fmt_s(step_bare), step_bare / step_ours,
           overhead=f"{100 * (step_ours / step_bare - 1):+.1f}%", epochs=epochs)
    for n_steps in sorted({steps, 50}):
        ours_total, bare_total = n_steps * step_ours + tail, n_steps * step_bare
        result("train", f"epoch of {n_steps} steps + tail", fmt_s(ours_total), "bare", fmt_s(bare_total),
               bare_total / ours_total, overhead=f"{100 * (ours_total / bare_total - 1):+.1f}%",
               tail=fmt_s(tail), last_pt=f"{ckpt_mb:.0f}MB")
    # build_optimizer's fused AdamW against torch's default (foreach) implementation
    fused_s, foreach_s = optimizer_step_times(model, recipe, pick(args.mode, 10, 5, 1))
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    result("train", "AdamW step, fused vs foreach", fmt_s(fused_s), "foreach", fmt_s(foreach_s), foreach_s / fused_s,
           params=f"{n_params:.1f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
