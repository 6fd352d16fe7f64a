"""exp093_5: RGB + normalised inverse depth as 4 input channels."""

import sys
from pathlib import Path

from kfold.cli import main

RECIPE = {"data.in_channels": 4}

if __name__ == "__main__":
    sys.exit(main(Path(__file__).stem, RECIPE))
