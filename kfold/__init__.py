"""foldwise k-fold training: data, splits, recipes, models, losses, one-fold training, OOF store."""

import os

# albumentations asks PyPI for a newer release at import time; no run of ours should touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
