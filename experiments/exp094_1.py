"""exp094_1: berHu depth loss, Kendall uncertainty weighting, edge-aware smoothness, and a two-rate
optimiser (encoder lr x 0.1) with the encoder frozen for the first epochs."""

import sys
from pathlib import Path

from kfold.cli import main

RECIPE = {
    "loss.depth_loss": "berhu",
    "loss.weighting": "kendall",
    "loss.smoothness_weight": 0.001,
    "optim.encoder_lr_scale": 0.1,
    "optim.freeze_encoder_epochs": 3,
}

if __name__ == "__main__":
    sys.exit(main(Path(__file__).stem, RECIPE))
