"""foldwise k-fold training: data, splits, recipes, models, losses, one-fold training, OOF store."""

import foldwise  # noqa: F401  (sets the environment that keeps every run off the network)

__version__ = "0.1.0"
