"""exp096_1: the multi-task V3 recipe: MobileNetV3-Small, depth + 6-class heads, hybrid depth target.

6 navigation classes through the shipped class map, berHu depth loss on the hybrid target (a depth
teacher's prediction where it has one, else the sensor), Kendall weighting (log sigma clamped to [-2, 2]),
edge-aware smoothness 0.1, encoder lr x 0.1 and frozen for 5 epochs, cosine over 200 epochs, batch 16.
"""

import sys
from pathlib import Path

from kfold.cli import main

RECIPE = {
    "model.encoder": "tu-mobilenetv3_small_100",
    "data.class_map": "nyu13_to_6",
    "loss.depth_target": "hybrid",
    "loss.depth_loss": "berhu",
    "loss.weighting": "kendall",
    "loss.smoothness_weight": 0.1,
    "optim.encoder_lr_scale": 0.1,
    "optim.freeze_encoder_epochs": 5,
    "schedule.epochs": 200,
    "train.batch_size": 16,
}

if __name__ == "__main__":
    sys.exit(main(Path(__file__).stem, RECIPE))
