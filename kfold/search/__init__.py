"""Recipe search (``python -m kfold.search``): Optuna trials that are k-fold experiments; see kfold.search.cli."""
