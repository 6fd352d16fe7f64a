"""bench/gpu_check.py --dry-run: the GPU check runs on CPU at tiny sizes and writes every row, so it cannot rot
before a GPU is at hand; bench/gpu_check.sh installs only carried wheels and names what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # trains and blends in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_dry_run_writes_every_row(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"].startswith("CPU dry run")
    figures = [(r["group"], r["figure"]) for r in report["rows"]]
    assert [g for g, _ in figures] == ["train"] * 5 + ["tta", "predict", "ddp", "smoke"]
    train = [f for g, f in figures if g == "train"]
    assert train == ["FPN RGB, eager", "FPN RGB, channels_last", "FPN RGB, channels_last + torch.compile",
                     "FPN RGB-D (4 channels), eager", "DeepLabV3+ RGB, eager"]
    for row in report["rows"]:
        assert row["ours"] != "FAILED", row
        if row["group"] in ("train", "tta", "predict") and row["ours"] != "skipped":
            assert row["ours"].endswith("img/s") and row["ratio"] > 0, row
    smoke = report["rows"][-1]["note"]
    assert "4 fold stores" in smoke and "blend (nested)" in smoke and "device cpu" in smoke, smoke
    table = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| ") and not line.startswith("| group")]) == 9


def test_the_wrapper_needs_only_carried_wheels(tmp_path: Path) -> None:
    listed = [line.split("==")[0] for line in (REPO / "bench" / "gpu_wheels.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert {"segmentation_models_pytorch", "albumentations", "ttach", "submitit", "webdataset"} <= set(listed)
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    assert "--no-index --no-deps" in script  # the install on the GPU machine never reaches a registry
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "out")], cwd=REPO,
                          env={**ENV, "GPU_WHEELS": str(tmp_path / "empty")}, capture_output=True, text=True,
                          timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(name in lines[0] for name in listed) and "--download" in lines[0]
    assert not (tmp_path / "out").exists()
