"""exp097_2: exp097_1 with a ResNet-18 encoder, a student as large as the demo's CPU-sized teachers.

``--opts distill.teacher NAME`` names the blend; ``--baseline`` also trains exp097_2_baseline. See docs/distill.md.
"""

import runpy
import sys
from pathlib import Path

from ensemble.distill import student_main

# exp097_1's recipe, read from its script (the one statement of the student) without running its main.
RECIPE = {**runpy.run_path(str(Path(__file__).with_name("exp097_1.py")))["RECIPE"], "model.encoder": "resnet18"}

if __name__ == "__main__":
    sys.exit(student_main(Path(__file__).stem, RECIPE))
