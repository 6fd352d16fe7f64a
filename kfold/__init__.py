"""foldwise k-fold training: data, splits, recipes, models, losses, one-fold training, OOF store."""

__version__ = "0.1.0"
