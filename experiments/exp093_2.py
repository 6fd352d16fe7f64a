"""exp093_2: the reference recipe: FPN + ConvNeXt-Base, CE + 0.1 x depth L1, EMA 0.999, 5-scale x flip TTA."""

import sys
from pathlib import Path

from kfold.cli import main

RECIPE = {}

if __name__ == "__main__":
    sys.exit(main(Path(__file__).stem, RECIPE))
