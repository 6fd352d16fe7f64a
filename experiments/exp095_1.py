"""exp095_1: the long-run 2-class sidewalk recipe, for a root whose classes.txt is background, sidewalk.

DeepLabV3+ ResNet-101 with SyncBatchNorm, initialised from another code base's checkpoint (--weights_path;
backbone.* keys become the encoder's), SGD momentum 0.9, 100,000 iterations of batch 48, linear warm-up over
1,000 iterations from 1e-6 to 1e-3 then cosine to 1e-4, gradient clipping at 1.0, hard pixel mining with
top-k 1.0 and class weights background 1 / sidewalk 10; validation and a checkpoint every 5,000 iterations.
Training streams webdataset shards (``python -m kfold.data.shards --data-root ROOT --out ROOT/shards``, or
``--opts data.shards DIR``) through a shuffle buffer of ``--buffer_batches`` batches.
"""

import sys
from pathlib import Path

from kfold.cli import main

RECIPE = {
    "model.arch": "deeplabv3plus",
    "model.encoder": "resnet101",
    "model.depth_head": False,
    "model.sync_bn": True,
    "model.init_key_map": {r"^backbone\.": "encoder."},
    "optim.name": "sgd",
    "optim.lr": 1e-3,
    "optim.momentum": 0.9,
    "optim.grad_clip": 1.0,
    "schedule.unit": "iterations",
    "schedule.iterations": 100_000,
    "schedule.warmup_iterations": 1_000,
    "schedule.warmup_lr_ratio": 1e-3,
    "schedule.min_lr_ratio": 0.1,
    "train.batch_size": 48,
    "train.eval_every": 5_000,
    "train.checkpoint_every": 5_000,
    "loss.ohem_fraction": 1.0,
    "loss.class_weights": {"background": 1.0, "sidewalk": 10.0},
    "data.streaming": True,
    "data.buffer_batches": 16,
}

if __name__ == "__main__":
    sys.exit(main(Path(__file__).stem, RECIPE))
