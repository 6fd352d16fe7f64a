"""exp093_6: DeepLabV3+ decoder instead of FPN."""

import sys
from pathlib import Path

from kfold.cli import main

RECIPE = {"model.arch": "deeplabv3plus"}

if __name__ == "__main__":
    sys.exit(main(Path(__file__).stem, RECIPE))
