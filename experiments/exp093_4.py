"""exp093_4: boundary-aware CE (boundary weight 2.0) with class weights 1.5 for books, table and tv."""

import sys
from pathlib import Path

from kfold.cli import main

RECIPE = {
    "loss.boundary_weight": 2.0,
    "loss.class_weights": {"books": 1.5, "table": 1.5, "tv": 1.5},
}

if __name__ == "__main__":
    sys.exit(main(Path(__file__).stem, RECIPE))
