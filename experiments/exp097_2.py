"""exp097_2: the ResNet-18 student of exp097_1 (the same recipe otherwise).

Fold k learns from the teacher blend's fold-k models only (weighted by the blend's nested fold-k parameters):
CE on the labels + 1.0 x T^2 x KL(teacher || student) at T = 1 on every pixel the teacher covers. Name the
blend with ``--opts distill.teacher NAME``; ``--baseline`` also trains exp097_1_baseline (no distillation) for the
recovered-gain report. See docs/distill.md.
"""

import sys
from pathlib import Path

from ensemble.distill import student_main

RECIPE = {
    "model.encoder": "resnet18",
    "model.decoder_channels": 64,
    "data.in_channels": 4,
    "tta.scales": [1.0],
    "tta.hflip": False,
    "distill.teacher": "exp093_blend",
    "distill.alpha": 1.0,
    "distill.temperature": 1.0,
}

if __name__ == "__main__":
    sys.exit(student_main(Path(__file__).stem, RECIPE))
