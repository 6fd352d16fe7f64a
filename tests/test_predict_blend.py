"""From blend to product: ensemble.predict on new images equals the submission, the export stands alone, and
bad images are skipped one line each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from submissions.rle import rle_decode

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def blended(smoke_runs, tmp_path_factory) -> Path:
    """An RGB and an RGB-D smoke experiment, blended with per-class weights into subs/pb.csv."""
    base = tmp_path_factory.mktemp("product")
    shutil.copytree(smoke_runs, base / "runs", ignore=shutil.ignore_patterns("last.pt"))  # resumable state: unused
    proc = run("ensemble/blend.py", "--runs-dir", str(base / "runs"), "--per-class", "--name", "pb", "--out-dir",
               str(base / "subs"), "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base


def assert_masks_equal_submission(masks: Path, submission: Path) -> None:
    sub = pd.read_csv(submission, keep_default_na=False)
    assert len(sub) > 0
    for image_id, class_id, rle in zip(sub.ImageId, sub.ClassId, sub.EncodedPixels):
        mask = np.array(Image.open(masks / f"{image_id}.png"))
        np.testing.assert_array_equal(rle_decode(rle, mask.shape).astype(bool), mask == class_id,
                                      err_msg=f"{image_id} class {class_id}")


def test_predict_equals_the_submission_and_the_export_stands_alone(blended, synthetic_root, tmp_path) -> None:
    images, depths = synthetic_root / "test" / "images", synthetic_root / "test" / "depths"
    proc = run("-m", "ensemble.predict", "--blend", "pb", "--runs-dir", str(blended / "runs"), "--submissions",
               str(blended / "subs"), "--images", str(images), "--depths", str(depths), "--out",
               str(tmp_path / "masks"), "--probs", "--color")
    assert proc.returncode == 0, proc.stderr
    assert_masks_equal_submission(tmp_path / "masks", blended / "subs" / "pb.csv")
    first = sorted(images.glob("*.png"))[0].stem
    probs = np.load(tmp_path / "masks" / f"{first}.npy")
    assert probs.dtype == np.float16 and probs.shape[0] == 13
    assert (tmp_path / "masks" / f"{first}_overlay.png").is_file()

    exported = run("-m", "ensemble.export", "--blend", "pb", "--runs-dir", str(blended / "runs"), "--submissions",
                   str(blended / "subs"), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr
    alone = Path(shutil.copytree(tmp_path / "export", tmp_path / "elsewhere" / "model"))
    shutil.rmtree(tmp_path / "export")
    record = json.loads((alone / "blend.json").read_text())
    assert [m["name"] for m in record["members"]] == ["exp093_2", "exp093_5"]
    assert len(record["members"][0]["folds"]) == 5
    # from a folder with no runs/ and no submissions/ in sight
    proc = run("-m", "ensemble.predict", "--model", str(alone), "--images", str(images), "--depths", str(depths),
               "--out", str(tmp_path / "masks2"), cwd=tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr
    assert_masks_equal_submission(tmp_path / "masks2", blended / "subs" / "pb.csv")

    weights = alone / "members" / "exp093_5" / "fold2.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = run("-m", "ensemble.predict", "--model", str(alone), "--images", str(images), "--depths", str(depths),
               "--out", str(tmp_path / "masks3"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(weights) in lines[0] and "sha256" in lines[0]


def test_bad_images_are_skipped_one_line_each(blended, synthetic_root, tmp_path) -> None:
    images, depths = tmp_path / "images", tmp_path / "depths"
    shutil.copytree(synthetic_root / "test" / "images", images)
    shutil.copytree(synthetic_root / "test" / "depths", depths)
    ids = sorted(p.stem for p in images.glob("*.png"))
    (depths / f"{ids[0]}.png").unlink()  # the RGB-D member cannot predict it
    Image.open(images / f"{ids[1]}.png").resize((80, 60)).save(images / f"{ids[1]}.png")
    (images / "zz_broken.png").write_bytes(b"not a png")
    proc = run("-m", "ensemble.predict", "--blend", "pb", "--runs-dir", str(blended / "runs"), "--submissions",
               str(blended / "subs"), "--images", str(images), "--depths", str(depths), "--out", str(tmp_path / "m"))
    assert proc.returncode == 1, proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 3 and "Traceback" not in proc.stderr
    assert f"missing depth for image {ids[0]!r}" in skipped[0] and "size 60x80" in skipped[1]
    assert "zz_broken.png" in skipped[2]
    written = sorted(p.stem for p in (tmp_path / "m").glob("*.png"))
    assert written == ids[2:]
