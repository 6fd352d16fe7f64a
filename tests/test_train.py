"""One fold end to end: the run folder, exact resume after SIGKILL, torchrun on CPU, recipe errors."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kfold.cli import main
from kfold.config import build_recipe, load_recipe
from kfold.data.layout import open_root
from kfold.distributed import DistInfo
from kfold.models import build_model, load_weights, model_from_recipe
from kfold.splits import read_folds
from kfold.train import build_loaders, evaluate, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--num_workers", "0"]


def run_script(args, env_extra=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_smoke_fold_writes_the_run_folder(synthetic_root, tmp_path, capsys):
    assert main("exp093_5", {"data.in_channels": 4},
                ["--fold", "0", "--data-root", str(synthetic_root), "--out", str(tmp_path), *SMOKE]) == 0
    run = tmp_path / "exp093_5" / "fold0"
    for name in ["config.yaml", "metrics.csv", "train.log", "last.pt", "model.safetensors", "oof.npy",
                 "test.npy", "oof_ids.txt", "test_ids.txt", "oof_temperature.csv", "manifest.json"]:
        assert (run / name).is_file(), name
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert {"lr", "train_total", "train_ce", "train_depth", "val_miou", "val_pixel_acc", "val_depth_rmse",
            "val_depth_absrel", "val_depth_delta1", "iou_wall"} <= set(metrics.columns)
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    recipe = load_recipe(run / "config.yaml")  # a run can be repeated from its config
    assert recipe.data.in_channels == 4 and recipe.name == "exp093_5"
    weights = load_file(run / "model.safetensors")
    assert weights["net.encoder.conv1.weight"].shape[1] == 4
    # A second call skips the complete fold.
    capsys.readouterr()
    main("exp093_5", {"data.in_channels": 4},
         ["--fold", "0", "--data-root", str(synthetic_root), "--out", str(tmp_path), *SMOKE])
    assert "complete, skipped" in capsys.readouterr().out


@pytest.mark.e2e
def test_resume_after_sigkill_matches_an_uninterrupted_run(synthetic_root, tmp_path):
    args = ["experiments/exp093_2.py", "--fold", "1", "--data-root", str(synthetic_root), *SMOKE,
            "--opts", "schedule.epochs", "4", "data.hflip", "0.5", "tta.scales", "[1.0]"]
    straight = run_script([*args, "--out", str(tmp_path / "a")])
    killed = run_script([*args, "--out", str(tmp_path / "b")])
    last = tmp_path / "b" / "exp093_2" / "fold1" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    epoch_done = torch.load(last, weights_only=True)["epoch"]
    assert epoch_done < 4
    resumed = run_script([*args, "--out", str(tmp_path / "b"), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    a = load_file(tmp_path / "a" / "exp093_2" / "fold1" / "model.safetensors")
    b = load_file(tmp_path / "b" / "exp093_2" / "fold1" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    rows = pd.read_csv(tmp_path / "b" / "exp093_2" / "fold1" / "metrics.csv")
    assert list(rows["epoch"]) == [1, 2, 3, 4]


@pytest.mark.e2e
def test_ctrl_c_stops_a_run_started_with_sigint_ignored(synthetic_root, tmp_path):
    """make demo's training jobs start with SIGINT ignored (background jobs of a shell): Ctrl-C must still stop
    them, with the one-line message, leaving last.pt and no manifest (``--resume`` is tested after SIGKILL)."""
    args = ["experiments/exp093_2.py", "--fold", "0", "--data-root", str(synthetic_root), *SMOKE,
            "--out", str(tmp_path), "--opts", "schedule.epochs", "50", "tta.scales", "[1.0]"]
    run = run_script(args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    last = tmp_path / "exp093_2" / "fold0" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert run.poll() is None, "the run ended before it could be interrupted"
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 130
    finally:
        run.kill()  # a run that ignored the SIGINT must not outlive the test
    assert "interrupted: finished folds are kept; run again with --resume" in run.stdout.read()
    assert torch.load(last, weights_only=True)["epoch"] < 50
    assert not (tmp_path / "exp093_2" / "fold0" / "manifest.json").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.e2e
def test_torchrun_two_cpu_processes_count_each_image_once(synthetic_root, tmp_path):
    root = open_root(synthetic_root)
    fold_of = read_folds(root)
    sizes = [sum(f == k for f in fold_of.values()) for k in range(5)]
    fold = next((k for k, n in enumerate(sizes) if n % 2), 0)  # an odd count: a padding sampler would repeat one
    torchrun = Path(sys.executable).parent / "torchrun"
    # Batches of one image make each image's logits independent of how the images are split over ranks.
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "experiments/exp093_2.py",
                           "--fold", str(fold), "--data-root", str(synthetic_root), "--out", str(tmp_path), *SMOKE,
                           "--opts", "oof.batch_size", "1"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "exp093_2" / f"fold{fold}"
    ddp_miou = pd.read_csv(run / "metrics.csv")["val_miou"].iloc[-1]
    recipe = load_recipe(run / "config.yaml")
    val_ids = [i for i in root.train_ids if fold_of[i] == fold]
    model = model_from_recipe(recipe, root.num_classes, pretrained=False)
    load_weights(model, run / "model.safetensors")
    loader = build_loaders(recipe, root, val_ids[:4], val_ids, DistInfo()).val_loader
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate(model, loader, root.num_classes, torch.device("cpu"), None)["miou"]
    finally:
        torch.set_num_threads(threads)
    assert single == pytest.approx(ddp_miou, abs=1e-9)


def test_opts_errors_are_one_line(synthetic_root, tmp_path, capsys):
    code = main("exp093_2", {}, ["--data-root", str(synthetic_root), "--out", str(tmp_path), *SMOKE,
                                 "--opts", "optim.lrr", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "optim.lr" in err and len(err.splitlines()) == 1
    code = main("exp093_2", {}, ["--data-root", str(synthetic_root), "--out", str(tmp_path), *SMOKE,
                                 "--opts", "train.batch_size", "four"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.batch_size" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "exp093_2").exists()


def test_warmup_then_cosine():
    f = [warmup_cosine(s, total_steps=10, warmup_steps=2, warmup_ratio=0.1, min_ratio=0.0) for s in range(11)]
    assert f[0] == pytest.approx(0.1) and f[2] == pytest.approx(1.0) and f[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))


def test_two_rate_optimiser_and_frozen_encoder(synthetic_root, tmp_path):
    base = {"optim.encoder_lr_scale": 0.1, "optim.freeze_encoder_epochs": 1, "optim.name": "sgd",
            "optim.grad_clip": 1.0, "schedule.warmup_epochs": 1, "loss.weighting": "kendall",
            "loss.depth_loss": "berhu"}
    assert main("exp_settings", base, ["--fold", "3", "--data-root", str(synthetic_root), "--out",
                                       str(tmp_path), *SMOKE]) == 0
    state = torch.load(tmp_path / "exp_settings" / "fold3" / "last.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["encoder", "decoder"]
    assert groups[0]["initial_lr"] == pytest.approx(0.1 * groups[1]["initial_lr"])
    assert set(state["loss"]) == {"log_sigma_seg", "log_sigma_depth"}


@pytest.mark.e2e
@pytest.mark.slow
def test_full_recipe_model_forward_backward_on_cpu():
    recipe = build_recipe({"data.in_channels": 4}, "full")
    model = build_model(recipe.model.arch, recipe.model.encoder, None, 4, 13)
    seg, depth = model(torch.randn(1, 4, *recipe.data.crop_size))
    (seg.mean() + depth.mean()).backward()
    assert seg.shape == (1, 13, 576, 768) and depth.shape == (1, 1, 576, 768)


def test_training_steps_read_nothing_off_the_device_each_step(monkeypatch):
    """On a GPU every read of a number (``.item()``, ``float()``, ``if tensor``) waits for the queue to drain;
    the loop reads once every SYNC_EVERY steps and once at the end, and still returns the mean loss parts."""
    from timm.utils import ModelEmaV3

    from kfold.train import SYNC_EVERY, build_loss, build_optimizer, train_steps

    recipe = build_recipe({"model.decoder_channels": 64}, "smoke")
    model = build_model("fpn", "resnet18", None, 3, 13, decoder_channels=64)
    loss_fn = build_loss(recipe, [str(c) for c in range(13)])
    optimizer = build_optimizer(model, loss_fn, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = ModelEmaV3(model, decay=0.9)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 64, 64, generator=g), "label": torch.randint(0, 13, (2, 64, 64), generator=g),
             "depth": torch.rand(2, 1, 64, 64, generator=g) + 0.5}
    steps = 2 * SYNC_EVERY + 3
    reads = [0]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            reads[0] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    stats = train_steps(model, model, ema, loss_fn, optimizer, scheduler, None, [batch] * steps, steps, recipe,
                        "epoch 1", False, torch.device("cpu"), None, show=False)
    monkeypatch.undo()
    assert reads[0] <= 2 * (steps // SYNC_EVERY + 1) + 1, reads[0]  # check (2 reads) per sync, one tolist at the end
    means = {k: v for k, v in stats.items() if k.startswith("train_")}
    assert set(means) >= {"train_total", "train_ce", "train_depth"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in means.values()), means
