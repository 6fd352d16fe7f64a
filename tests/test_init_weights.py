"""Initial weights from another code base (renamed keys, non-strict load, init_report.txt), SyncBN as a
setting, and the final validation / test table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kfold.models import build_model
from kfold.weights import init_from

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def torchvision_deeplab(tmp_path_factory) -> Path:
    """A torchvision DeepLabV3-ResNet-101 state dict (random init: no download), as another code base saves it."""
    from torchvision.models.segmentation import deeplabv3_resnet101

    torch.manual_seed(0)
    net = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    path = tmp_path_factory.mktemp("foreign") / "deeplabv3_resnet101.pth"
    torch.save({"model": net.state_dict()}, path)
    return path


def test_a_torchvision_deeplab_initialises_the_encoder(torchvision_deeplab) -> None:
    model = build_model("deeplabv3plus", "resnet101", None, 3, 2, depth_head=False, decoder_channels=64)
    foreign = torch.load(torchvision_deeplab, weights_only=True)["model"]
    report = init_from(model, torchvision_deeplab, {r"^backbone\.": "encoder."})
    backbone = [k for k in foreign if k.startswith("backbone.")]
    assert len(report.loaded) == len(backbone) and report.total == len(model.state_dict())
    assert all(k.startswith("net.encoder.") for k in report.loaded)
    assert report.unused and all(k.startswith(("classifier.", "aux_classifier.")) for k in report.unused)
    assert any(k.startswith("net.decoder.") for k in report.missing) and not report.mismatched
    key = "backbone.layer3.22.conv2.weight"
    torch.testing.assert_close(model.state_dict()["net.encoder.layer3.22.conv2.weight"], foreign[key])
    assert report.text().splitlines()[0] == (f"loaded {len(backbone)} of {report.total} model tensors from "
                                             f"{torchvision_deeplab}")


def test_through_the_command_line(torchvision_deeplab, synthetic_root, tmp_path) -> None:
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "experiments/exp093_6.py", "--preset", "smoke", "--data-root", str(synthetic_root),
         "--out", str(out), "--fold", "0", "--weights_path", str(torchvision_deeplab), "--opts", "model.encoder",
         "resnet101", "model.init_key_map", '{"^backbone\\\\.": "encoder."}', "model.sync_bn", "true",
         "train.max_steps_per_epoch", "1", "schedule.epochs", "1"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "exp093_6" / "fold0"
    report = (run_dir / "init_report.txt").read_text().splitlines()
    assert report[0].startswith("loaded ") and f"model tensors from {torchvision_deeplab}" in report[0]
    assert any(line.strip().startswith("classifier.") for line in report)
    log = (run_dir / "train.log").read_text()
    assert "model.sync_bn: single process, BatchNorm kept" in log and report[0] in log
    final = (run_dir / "final_metrics.csv").read_text().splitlines()
    assert final[0] == "metric,validation,test" and final[1].startswith("pixel_acc,") and final[2].startswith("miou,")


def test_convert_renames_once_offline(torchvision_deeplab, tmp_path) -> None:
    out = tmp_path / "init.safetensors"
    proc = subprocess.run([sys.executable, "-m", "kfold.weights", "convert", str(torchvision_deeplab), "--map",
                           r"^backbone\.=encoder.", "--map", r"^aux_classifier\.=aux.", "--out", str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    keys = set(load_file(out))
    assert "encoder.layer4.2.conv3.weight" in keys and "aux.0.weight" in keys and not any("backbone" in k for k in keys)
    bad = subprocess.run([sys.executable, "-m", "kfold.weights", "convert", str(torchvision_deeplab), "--map",
                          "no-equals-sign", "--out", str(tmp_path / "x.safetensors")],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "--map 'no-equals-sign'" in lines[0]
    assert not (tmp_path / "x.safetensors").exists()


def sidewalk_root(synthetic_root: Path, out: Path) -> Path:
    """A 2-class root (background, sidewalk) from the synthetic rooms: floor becomes sidewalk."""
    import shutil

    import numpy as np
    from PIL import Image

    root = Path(shutil.copytree(synthetic_root, out, ignore=shutil.ignore_patterns("folds.csv", ".folds.lock")))
    (root / "classes.txt").write_text("background\nsidewalk\n")
    for path in [*(root / "train" / "labels").glob("*.png"), *(root / "test_labels").glob("*.png")]:
        label = np.array(Image.open(path))
        Image.fromarray(np.where(label == 255, 255, (label == 4).astype(np.uint8)).astype(np.uint8)).save(path)
    return root


def test_exp095_1_smoke_on_a_two_class_root(synthetic_root, tmp_path) -> None:
    root = sidewalk_root(synthetic_root, tmp_path / "sidewalk")
    out = tmp_path / "runs"
    shards = subprocess.run([sys.executable, "-m", "kfold.data.shards", "--data-root", str(root)], cwd=REPO,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert shards.returncode == 0, shards.stderr  # the default --out, <root>/shards, is where exp095_1 looks
    proc = subprocess.run([sys.executable, "experiments/exp095_1.py", "--preset", "smoke", "--data-root", str(root),
                           "--out", str(out), "--fold", "0"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "exp095_1" / "fold0"
    final = [line.split(",") for line in (run_dir / "final_metrics.csv").read_text().splitlines()]
    assert final[0] == ["metric", "validation", "test"]
    assert [row[0] for row in final[1:]] == ["pixel_acc", "miou", "iou_background", "iou_sidewalk"]
    import pandas as pd

    assert list(pd.read_csv(run_dir / "metrics.csv")["iteration"]) == [3, 6]  # the smoke preset's 6 iterations
