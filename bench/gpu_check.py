"""The one prepared device check: foldwise's training step, TTA and predictor on a GPU, each beside a plain
implementation on the same model and batch, and proofs that the DDP / SyncBN and end-to-end device paths run.

    bench/gpu_check.sh                                # on a GPU machine: carried wheels, then this (--out $OUT)
    python bench/gpu_check.py --dry-run --out DIR     # tiny sizes on CPU, seconds: the suite runs it

Rows (written to DIR/gpu_check.json and DIR/gpu_check.md as they come, so a run cut short keeps its rows):
- train: the reference recipe (FPN + ConvNeXt-Base, random init, 576x768 crops, batch 4, bf16 autocast, EMA,
  CE + 0.1 x depth L1, fused AdamW) through ``kfold.train.train_steps`` against a plain loop written here
  doing the same work (forward, loss, backward, step, schedule, EMA) with none of the bookkeeping; images/s
  and peak GPU memory; eager, channels_last, and channels_last + torch.compile; the RGB-D and DeepLabV3+ rows;
- tta: the recipe's TTA (5 scales x flip) through ``tta.predict_tta`` against ttach on the same model;
- predict: ``ensemble.predict.predict_masks`` over 2 experiments x 5 folds against a plain loop over members,
  fold models and views;
- ddp: one training step of a DDP model (NCCL on CUDA, gloo on CPU) at world size 1 with SyncBatchNorm
  converted (CUDA only);
- smoke: two experiments trained on 2 folds each by their scripts, their OOF stores, and their blend.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import ttach
from timm.utils import ModelEmaV3
from torch import nn

from ensemble.bundle import BlendBundle, MemberBundle
from ensemble.predict import LoadedMember, predict_masks
from foldwise.classes import DEFAULT_CLASSES
from foldwise.io import write_json, write_text
from kfold.config import build_recipe
from kfold.data.dataset import model_input
from kfold.data.transforms import EvalTransform
from kfold.models import amp_dtype, model_from_recipe
from kfold.store.read import full_res_argmax
from kfold.train import build_loss, build_optimizer, train_steps
from tta import TTAConfig, predict_tta

REPO = Path(__file__).resolve().parents[1]
GOALS = {"train": 0.95, "tta": 1.0}  # ours / plain at least this (the goals)


@dataclass(frozen=True)
class Sizes:
    encoder: str = "tu-convnext_base"
    crop: tuple[int, int] = (576, 768)
    batch: int = 4
    warmup: int = 5
    steps: int = 20
    tta_size: tuple[int, int] = (768, 1024)  # every TTA scale a multiple of 32, as ttach needs
    tta_batch: int = 2
    predict_size: tuple[int, int] = (480, 640)
    predict_images: int = 4
    compile: bool = True
    smoke_train: int = 40


DRY = Sizes(encoder="resnet18", crop=(64, 64), batch=2, warmup=1, steps=2, tta_size=(128, 128), tta_batch=1,
            predict_size=(64, 64), predict_images=1, compile=False, smoke_train=12)


@dataclass
class Row:
    group: str
    figure: str
    ours: str = "not measured"
    reference: str = ""
    ratio: float | None = None
    goal: float | None = None
    peak_gib: str = ""
    note: str = ""

    @property
    def met(self) -> str:
        if self.goal is None or self.ratio is None:
            return ""
        return "yes" if self.ratio >= self.goal else "no"


@dataclass
class Report:
    out: Path
    device: str
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        print(f"{row.group:<8} {row.figure:<44} ours {row.ours:<16} {row.reference:<28} {ratio:<7} {row.note}",
              flush=True)
        self.write()

    def write(self) -> None:
        write_json(self.out / "gpu_check.json", {"device": self.device, "rows": [
            {**asdict(r), "met": r.met} for r in self.rows]})
        lines = [f"Device: {self.device}", "", "| group | figure | ours | reference | ratio | goal | met | peak GPU "
                 "memory (ours / plain) | note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
            goal = f">= {r.goal:.2f}x" if r.goal is not None else ""
            lines.append(f"| {r.group} | {r.figure} | {r.ours} | {r.reference} | {ratio} | {goal} | {r.met} | "
                         f"{r.peak_gib} | {r.note} |")
        write_text(self.out / "gpu_check.md", "\n".join(lines) + "\n")

    def attempt(self, group: str, figure: str, fn: Callable[[], list[Row]]) -> None:
        """Run one check; a failure becomes its row (the other checks still run)."""
        try:
            for row in fn():
                self.add(row)
        except Exception as err:  # noqa: BLE001 - a failed check is a result to report, not a crash
            traceback.print_exc()
            self.add(Row(group, figure, "FAILED", note=" ".join(f"{type(err).__name__}: {err}".split())[:300]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(seconds, peak GiB allocated on the GPU during fn; 0 on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return seconds, peak


def host_batches(sizes: Sizes, in_channels: int, device: torch.device, n: int) -> list[dict[str, torch.Tensor]]:
    """Training batches on the host (pinned on CUDA, as the loaders make them), moved by each loop itself."""
    g = torch.Generator().manual_seed(0)
    h, w = sizes.crop
    out = []
    for _ in range(n):
        batch = {"image": torch.rand(sizes.batch, in_channels, h, w, generator=g),
                 "label": torch.randint(0, 13, (sizes.batch, h, w), generator=g, dtype=torch.uint8),
                 "depth": torch.rand(sizes.batch, 1, h, w, generator=g) * 5 + 0.5}
        out.append({k: v.pin_memory() if device.type == "cuda" else v for k, v in batch.items()})
    return out


def plain_steps(model: nn.Module, train_model: nn.Module, ema: ModelEmaV3, loss_fn: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler, batches: list[dict], device: torch.device,
                autocast: torch.dtype | None) -> None:
    """The same work as a training step, by hand: no progress, no loss bookkeeping, no checks."""
    train_model.train()
    for batch in batches:
        image, label, depth = (batch[k].to(device, non_blocking=True) for k in ("image", "label", "depth"))
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            seg, depth_pred = train_model(image)
        loss, _ = loss_fn(seg.float(), depth_pred.float(), label, depth, image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update(model, step=scheduler.last_epoch)


def train_check(sizes: Sizes, device: torch.device, label: str, base: dict, variants: tuple[str, ...]
                ) -> list[Row]:
    recipe = build_recipe({"model.encoder": sizes.encoder, "model.encoder_weights": None,
                           "data.crop_size": sizes.crop, "train.batch_size": sizes.batch, **base}, "full")
    in_channels = recipe.data.in_channels
    model = model_from_recipe(recipe, 13, pretrained=False).to(device)
    loss_fn = build_loss(recipe, DEFAULT_CLASSES).to(device)
    optimizer = build_optimizer(model, loss_fn, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = ModelEmaV3(model, decay=recipe.train.ema_decay)
    autocast = amp_dtype(recipe.train.amp, device)
    batches = host_batches(sizes, in_channels, device, sizes.steps)
    rows = []
    for variant in variants:
        train_model = model
        if variant != "eager":
            model.to(memory_format=torch.channels_last)
            batches = [{**b, "image": b["image"].contiguous(memory_format=torch.channels_last)} for b in batches]
        if variant == "channels_last + torch.compile":
            train_model = torch.compile(model)
        ours = partial(train_steps, model, train_model, ema, loss_fn, optimizer, scheduler, None, recipe=recipe,
                       stretch="gpu_check", frozen=False, device=device, autocast=autocast, show=False)
        plain = partial(plain_steps, model, train_model, ema, loss_fn, optimizer, scheduler, device=device,
                        autocast=autocast)
        warm, timed_batches = batches[: sizes.warmup], batches[: sizes.steps]
        ours(warm, len(warm))  # allocator, cuDNN autotuning, compilation
        plain(warm)
        t_ours, m_ours = timed(lambda: ours(timed_batches, len(timed_batches)), device)  # noqa: B023 - called here
        t_plain, m_plain = timed(lambda: plain(timed_batches), device)  # noqa: B023
        n = sizes.steps * sizes.batch
        rows.append(Row("train", f"{label}, {variant}", f"{n / t_ours:.2f} img/s",
                        f"plain loop {n / t_plain:.2f} img/s", t_plain / t_ours, GOALS["train"],
                        f"{m_ours:.1f} / {m_plain:.1f} GiB",
                        f"batch {sizes.batch}, {sizes.crop[0]}x{sizes.crop[1]}, amp {autocast}"))
    return rows


def tta_check(sizes: Sizes, device: torch.device) -> list[Row]:
    recipe = build_recipe({"model.encoder": sizes.encoder, "model.encoder_weights": None}, "full")
    model = model_from_recipe(recipe, 13, pretrained=False).to(device).eval()
    seg_only = SegOnly(model)
    autocast = amp_dtype(recipe.train.amp, device)
    scales = recipe.tta.scales
    cfg = TTAConfig(scales=scales, hflip=True, stride=32, max_batch=recipe.tta.max_batch, temperatures=(1.0,))
    extra = [s for s in scales if s != 1.0]
    wrapper = ttach.SegmentationTTAWrapper(nn.Sequential(seg_only, nn.Softmax(dim=1)), ttach.Compose(
        [ttach.HorizontalFlip(), ttach.Scale(scales=extra, interpolation="bilinear", align_corners=False)]),
        merge_mode="mean")
    images = torch.rand(sizes.tta_batch, 3, *sizes.tta_size, generator=torch.Generator().manual_seed(1)).to(device)
    out: dict[str, torch.Tensor] = {}

    def run(name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def body() -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                                        enabled=autocast is not None):
                out[name] = fn()
        return body

    ours = run("ours", lambda: predict_tta(seg_only, images, cfg).probs[1.0])
    ref = run("ttach", lambda: wrapper(images))
    ours(), ref()  # warm-up
    (t_ours, m_ours), (t_ref, m_ref) = timed(ours, device), timed(ref, device)
    diff = (out["ours"].float() - out["ttach"].float()).abs().max().item()
    n = sizes.tta_batch
    return [Row("tta", f"{len(scales)} scales x flip, batch {n}, {sizes.tta_size[0]}x{sizes.tta_size[1]}",
                f"{n / t_ours:.2f} img/s", f"ttach {n / t_ref:.2f} img/s", t_ref / t_ours, GOALS["tta"],
                f"{m_ours:.1f} / {m_ref:.1f} GiB", f"max abs diff {diff:.1e} (scales: logits vs probs resized)")]


class SegOnly(nn.Module):
    """The segmentation logits of a SegDepthNet (ttach merges one tensor)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def predict_check(sizes: Sizes, device: torch.device) -> list[Row]:
    size = sizes.predict_size
    members, bundles = [], []
    for name, channels in (("rgb", 3), ("rgbd", 4)):
        recipe = build_recipe({"model.encoder": sizes.encoder, "model.encoder_weights": None, "data.input_size": size,
                               "data.in_channels": channels, "oof.batch_size": sizes.predict_images}, "full")
        torch.manual_seed(channels)
        models = [model_from_recipe(recipe, 13, pretrained=False).to(device).eval() for _ in range(5)]
        bundle = MemberBundle(name, recipe, (), (size[0] // 2, size[1] // 2))
        members.append(LoadedMember(bundle, models))
        bundles.append(bundle)
    blend = BlendBundle("gpu_check", tuple(DEFAULT_CLASSES), size, np.array([0.5, 0.5]), np.ones(2), tuple(bundles))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(sizes.predict_images)]
    depths = [rng.integers(500, 5000, size, dtype=np.uint16).astype(np.float32) / 1000 for _ in images]
    masks: dict[str, np.ndarray] = {}

    def ours() -> None:
        with torch.inference_mode():
            masks["ours"] = predict_masks(members, blend, images, depths, device)[0]

    def plain() -> None:
        masks["plain"] = plain_predict(members, images, depths, device, size)

    ours(), plain()  # warm-up
    (t_ours, m_ours), (t_plain, m_plain) = timed(ours, device), timed(plain, device)
    same = float((masks["ours"] == masks["plain"]).mean())
    n, views = sizes.predict_images, 2 * len(members[0].bundle.recipe.tta.scales)
    return [Row("predict", f"2 experiments x 5 folds x {views} views, {n} img {size[0]}x{size[1]}",
                f"{n / t_ours:.2f} img/s", f"plain loop {n / t_plain:.2f} img/s", t_plain / t_ours, None,
                f"{m_ours:.1f} / {m_plain:.1f} GiB", f"same pixels {100 * same:.1f}%")]


def plain_predict(members: list[LoadedMember], images: list[np.ndarray], depths: list[np.ndarray],
                  device: torch.device, size: tuple[int, int]) -> np.ndarray:
    """By hand: every image through every fold model of every member, one view per forward pass."""
    out = []
    with torch.inference_mode():
        for image, depth in zip(images, depths):
            blended = 0.0
            for member in members:
                recipe = member.bundle.recipe
                amp = amp_dtype(recipe.train.amp, device)
                x = model_input(image, depth, EvalTransform(recipe.data.input_size), recipe.data.in_channels)
                x = x[None].to(device)
                folds = 0.0
                for model in member.models:
                    views = 0.0
                    for scale in recipe.tta.scales:
                        hw = [-(-max(1, int(s * scale + 0.5)) // 32) * 32 for s in size]
                        scaled = nn.functional.interpolate(x, size=hw, mode="bilinear", align_corners=False)
                        for flip in (False, True):
                            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                                logits = model(scaled.flip(-1) if flip else scaled)[0].float()
                            logits = logits.flip(-1) if flip else logits
                            logits = nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                            views = views + torch.softmax(logits, dim=1)
                    folds = folds + views / (2 * len(recipe.tta.scales))
                blended = blended + 0.5 * folds / len(member.models)
            out.append(full_res_argmax(blended.float().cpu(), size).numpy()[0])
    return np.stack(out)


def ddp_check(sizes: Sizes, device: torch.device) -> list[Row]:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            recipe = build_recipe({"model.encoder": "resnet18", "model.encoder_weights": None,
                                   "data.crop_size": (64, 64), "train.batch_size": 2}, "full")
            model = model_from_recipe(recipe, 13, pretrained=False).to(device)
            converted = 0
            if device.type == "cuda":  # torch's SyncBatchNorm refuses CPU tensors
                converted = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [device.index] if device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            loss_fn = build_loss(recipe, DEFAULT_CLASSES).to(device)
            optimizer = build_optimizer(model, loss_fn, recipe)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            ema = ModelEmaV3(model, decay=0.9)
            small = Sizes(crop=(64, 64), batch=2)
            stats = train_steps(model, ddp, ema, loss_fn, optimizer, scheduler, None,
                                host_batches(small, 3, device, 1), 1, recipe, "ddp", False, device,
                                amp_dtype(recipe.train.amp, device), show=False)
        finally:
            dist.destroy_process_group()
    sync_bn = (f"{converted} BatchNorm layers -> SyncBatchNorm" if converted
               else "SyncBatchNorm: CUDA only, not converted")
    return [Row("ddp", f"one step, {backend}, world size 1", "ran", note=f"{sync_bn}; loss {stats['train_total']:.3f}")]


def smoke_check(sizes: Sizes, device: torch.device, work: Path) -> list[Row]:
    """Two experiments on 2 folds each, through their scripts, then their blend: the device paths end to end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root, runs, subs = work / "data", work / "runs", work / "subs"

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return proc.stdout + proc.stderr

    start = time.perf_counter()
    run("-m", "kfold.data.synthetic", "--out", str(root), "--train", str(sizes.smoke_train), "--test", "4",
        "--size", "48x64", "--seed", "0")
    experiments = [subprocess.Popen([sys.executable, f"experiments/{exp}.py", "--preset", "smoke", "--data-root",
                                     str(root), "--out", str(runs), "--opts", "data.k_folds", "2"], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for exp in ("exp093_2", "exp093_5")]  # side by side, as make demo runs them
    for exp in experiments:
        _, err = exp.communicate(timeout=300)
        if exp.returncode != 0:
            raise RuntimeError(f"{exp.args[1]}: exit {exp.returncode}: {err.strip()[-300:]}")
    blend = run("ensemble/blend.py", "--runs-dir", str(runs), "--runs", "exp093_2", "exp093_5", "--name", "smoke",
                "--out-dir", str(subs), "--workers", "1")
    manifests = sorted(runs.glob("*/fold*/manifest.json"))
    paths = next(line.split(" INFO ", 1)[-1] for line in (runs / "exp093_2" / "fold0" / "train.log").read_text()
                 .splitlines() if " INFO device " in line)
    nested = next((line for line in blend.splitlines() if line.startswith("blend (nested)")), "no nested row")
    return [Row("smoke", "2 experiments x 2 folds: train, OOF store, blend", "ran",
                note=f"{len(manifests)} fold stores; {' '.join(nested.split()[:4])}; {paths}; "
                     f"{time.perf_counter() - start:.0f} s")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    sizes = DRY if args.dry_run else Sizes()
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        torch.set_num_threads(1)
        name = f"CPU dry run (tiny sizes: the figures mean nothing), torch {torch.__version__}"
    report = Report(args.out, name)
    start = time.perf_counter()
    variants = ("eager", "channels_last", "channels_last + torch.compile") if sizes.compile else (
        "eager", "channels_last")
    report.attempt("train", "FPN ConvNeXt-Base", lambda: train_check(sizes, device, "FPN RGB", {}, variants))
    if not sizes.compile:
        report.add(Row("train", "FPN RGB, channels_last + torch.compile", "skipped", note="dry run: not compiled"))
    report.attempt("train", "FPN RGB-D", lambda: train_check(sizes, device, "FPN RGB-D (4 channels)",
                                                             {"data.in_channels": 4}, ("eager",)))
    report.attempt("train", "DeepLabV3+", lambda: train_check(sizes, device, "DeepLabV3+ RGB",
                                                              {"model.arch": "deeplabv3plus"}, ("eager",)))
    report.attempt("tta", "TTA", lambda: tta_check(sizes, device))
    report.attempt("predict", "ensemble.predict", lambda: predict_check(sizes, device))
    report.attempt("ddp", "DDP + SyncBN", lambda: ddp_check(sizes, device))
    with tempfile.TemporaryDirectory() as work:
        report.attempt("smoke", "one fold end to end", lambda: smoke_check(sizes, device, Path(work)))
    print(f"gpu_check: {len(report.rows)} rows in {time.perf_counter() - start:.0f} s -> {args.out}/gpu_check.md",
          flush=True)
    return 1 if any(r.ours == "FAILED" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
