"""exp094_2: SGD with linear warm-up, cosine and gradient clipping; class-weighted CE with hard pixel mining."""

import sys
from pathlib import Path

from kfold.cli import main

RECIPE = {
    "optim.name": "sgd",
    "optim.lr": 0.01,
    "optim.momentum": 0.9,
    "optim.grad_clip": 1.0,
    "schedule.warmup_epochs": 2,
    "loss.class_weights": {"books": 2.0, "tv": 2.0, "picture": 1.5},
    "loss.ohem_fraction": 0.25,
}

if __name__ == "__main__":
    sys.exit(main(Path(__file__).stem, RECIPE))
