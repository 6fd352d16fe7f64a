"""exp097_1: one fast model from the fold ensemble: FPN + MobileNetV3-Small, RGB-D, one view, distilled leak-free.

Fold k learns from the teacher blend's fold-k models only (weighted by the blend's nested fold-k parameters):
CE on the labels + 1.0 x T^2 x KL(teacher || student) at T = 1 on every pixel the teacher covers. Name the
blend with ``--opts distill.teacher NAME``; ``--baseline`` also trains exp097_1_baseline (no distillation) for the
recovered-gain report. See docs/distill.md.
"""

import sys
from pathlib import Path

from ensemble.distill import student_main

RECIPE = {
    "model.encoder": "tu-mobilenetv3_small_100",
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
