"""Streamed training data: shards written from a root, passes that cover every training id once across ranks
and loader workers, resumes that read on exactly, and a streamed run under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kfold.data.dataset import SegmentationDataset
from kfold.data.layout import open_root
from kfold.data.shards import read_index
from kfold.data.stream import ShardStream, stream_ids
from kfold.data.transforms import TrainTransform
from kfold.splits import read_folds

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}


def shards_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kfold.data.shards", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shards(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "shards"
    proc = shards_cli("--data-root", str(synthetic_root), "--out", str(out), "--shard-size", "3")
    assert proc.returncode == 0, proc.stderr
    return out


def fold_stream(synthetic_root: Path, shards: Path, rank: int = 0, world: int = 1, workers: int = 0,
                batch: int = 2) -> ShardStream:
    root = open_root(synthetic_root, verify=False)
    folds = read_folds(root)
    train_ids = [i for i in root.train_ids if folds[i] != 0]
    dataset = SegmentationDataset(root, "train", train_ids, TrainTransform((48, 64), (32, 48), hflip=0.5))
    return ShardStream(read_index(shards), dataset, seed=7, batch=batch, buffer_batches=2, rank=rank, world=world,
                       workers=workers)


def test_shards_hold_every_train_image_byte_for_byte(synthetic_root, shards, tmp_path) -> None:
    root = open_root(synthetic_root, verify=False)
    index = read_index(shards)
    assert index.ids == list(root.train_ids) and len(index.shards) == -(-len(root.train_ids) // 3)
    with tarfile.open(index.shards[0].path) as tar:
        first = index.shards[0].ids[0]
        data = tar.extractfile(f"{first}.image.png").read()
        assert data == root.image_path("train", first).read_bytes()
        assert {Path(n).name.split(".", 1)[1] for n in tar.getnames()} >= {"image.png", "depth.png", "label.png"}
    record = json.loads((shards / "shards.json").read_text())
    assert record["classes"] == list(root.classes) and record["folds_sha256"]
    for args, words in ((["--shard-size", "0"], "--shard-size must be >= 1"),
                        (["--out", str(shards)], "not empty"),
                        (["--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "nowhere")):
        base = {"--data-root": str(synthetic_root), "--out": str(tmp_path / "new")}
        base.update(dict(zip(args[::2], args[1::2])))
        proc = shards_cli(*[x for kv in base.items() for x in kv])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2)])
def test_a_pass_yields_every_training_id_once(synthetic_root, shards, world, workers) -> None:
    """Ranks x loader workers share the shards: each pass is every training id of the fold, once; the
    validation fold is held out; another pass is another order."""
    streams = [fold_stream(synthetic_root, shards, rank, world, workers) for rank in range(world)]
    expected = sorted(streams[0].dataset.ids)
    for p in (0, 1):
        seen = [i for s in streams for batch in stream_ids(s, p) for i in batch]
        assert sorted(seen) == expected, p
    first = [i for batch in stream_ids(streams[0], 0) for i in batch]
    assert first != [i for batch in stream_ids(streams[0], 1) for i in batch]


def test_the_loader_yields_the_computed_order_and_resumes_mid_pass_exactly(synthetic_root, shards) -> None:
    """Through DataLoader workers: the batches are those stream_ids computes; steps k..n from a fresh stream
    (a resume) are the uninterrupted run's, augmentations included, across a pass boundary."""
    stream = fold_stream(synthetic_root, shards, rank=1, world=2, workers=2)
    per_pass = len(stream.batch_order(0))
    total = per_pass + 3  # into the second pass
    straight = list(stream.steps(0, total))
    assert [b["id"] for b in straight[:per_pass]] == stream_ids(stream, 0)
    assert [b["id"] for b in straight[per_pass:]] == stream_ids(stream, 1)[:3]
    for start in (4, 5, per_pass + 1):  # either worker's turn, and inside the second pass
        resumed = list(fold_stream(synthetic_root, shards, rank=1, world=2, workers=2).steps(start, total))
        assert [b["id"] for b in resumed] == [b["id"] for b in straight[start:]], start
        for a, b in zip(resumed, straight[start:]):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_a_root_that_does_not_match_the_shards_is_one_line(synthetic_root, shards, tmp_path) -> None:
    from test_init_weights import sidewalk_root

    two_class = sidewalk_root(synthetic_root, tmp_path / "sidewalk")
    proc = subprocess.run([sys.executable, "experiments/exp095_1.py", "--preset", "smoke", "--data-root",
                           str(two_class), "--out", str(tmp_path / "runs"), "--fold", "0", "--opts", "data.shards",
                           str(shards)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "shards.json: classes" in lines[0] and "differ" in lines[0]
    assert not (tmp_path / "runs" / "exp095_1" / "fold0" / "last.pt").exists()


def _oof_ids(run: Path) -> list[str]:
    return [i for d in sorted(run.glob("fold*")) for i in (d / "oof_ids.txt").read_text().split()]


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_streamed_sidewalk_run_under_torchrun_with_sync_bn(synthetic_root, tmp_path) -> None:
    """exp095_1 (data.streaming, model.sync_bn) on shards of a 2-class root, two processes, every fold: the
    OOF store covers every training id once."""
    from test_init_weights import sidewalk_root

    root = sidewalk_root(synthetic_root, tmp_path / "sidewalk")
    assert shards_cli("--data-root", str(root), "--out", str(root / "shards"), "--shard-size", "4").returncode == 0
    out = tmp_path / "runs"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "experiments/exp095_1.py",
                           "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--buffer_batches", "4",
                           "--opts", "model.encoder", "resnet18"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = out / "exp095_1"
    ids = _oof_ids(run)
    assert sorted(ids) == sorted(open_root(root, verify=False).train_ids) and len(ids) == len(set(ids))
    log = (run / "fold0" / "train.log").read_text()
    assert "data.streaming:" in log and "shuffle buffer 4 batches" in log
    assert "model.sync_bn: SyncBatchNorm needs CUDA" in log  # CPU: torch has no SyncBatchNorm kernel
    assert np.isfinite(np.load(run / "fold0" / "oof.npy").astype(np.float32)).all()


def test_a_streamed_run_killed_mid_pass_resumes_to_the_same_weights(synthetic_root, shards, tmp_path) -> None:
    """Iterations from the stream, two loader workers: SIGKILL after the iteration-20 checkpoint, --resume,
    and the run ends with the weights of an uninterrupted one."""
    from test_faults import kill_at, same_weights
    from test_iterations import ITERATIONS, experiment

    opts = ["--num_workers", "2", "--buffer_batches", "2", "--opts", *ITERATIONS, "data.streaming", "true",
            "data.shards", str(shards)]
    straight = subprocess.run([sys.executable, *experiment(synthetic_root, tmp_path / "straight", *opts)], cwd=REPO,
                              env=ENV, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    cmd = experiment(synthetic_root, tmp_path / "runs", *opts)
    kill_at(cmd, "loss:25", tmp_path)
    resumed = subprocess.run([sys.executable, *cmd, "--resume"], cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir, reference = (tmp_path / name / "exp093_2" / "fold0" for name in ("runs", "straight"))
    log = (run_dir / "train.log").read_text()
    assert f"resumed {run_dir} at iteration 20/40" in log and "data.streaming:" in log
    assert same_weights(run_dir / "model.safetensors", reference / "model.safetensors")


def test_an_epoch_recipe_trains_from_the_stream(synthetic_root, shards, tmp_path) -> None:
    """exp093_2 (epochs) streamed: each epoch takes as many steps as a map-style one, and predicts as usual."""
    from test_iterations import experiment

    proc = subprocess.run([sys.executable, *experiment(synthetic_root, tmp_path / "runs", "--buffer_batches", "4",
                                                       "--opts", "data.streaming", "true", "data.shards",
                                                       str(shards))],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "exp093_2" / "fold0"
    assert "shuffle buffer 4 batches" in (run_dir / "train.log").read_text()
    assert (run_dir / "manifest.json").is_file() and (run_dir / "model.safetensors").is_file()


def test_worker_count_is_part_of_a_streamed_recipe(tmp_path) -> None:
    """Loader workers decide how a stream deals its shards: another count is another run; map-style not."""
    from kfold.config import build_recipe
    from kfold.rundir import recipe_differences, write_config

    recipe = build_recipe({}, "smoke")
    for streaming in (False, True):
        recipe.data.streaming, recipe.data.num_workers = streaming, 0
        write_config(tmp_path, recipe, tmp_path, 0, "sha")
        recipe.data.num_workers = 2
        recipe.data.shards = str(tmp_path / "elsewhere")  # the same shards moved: never a difference
        assert recipe_differences(tmp_path, recipe) == (["data.num_workers"] if streaming else [])
        recipe.data.shards = None
