"""The OOF store: one package for its format (``format``), writing a fold's store (``write``) and reading an
experiment's folds as one store (``read``). See docs/ARCHITECTURE.md, "Run folder"."""

from kfold.store.format import (
    MANIFEST,
    STORE_DTYPE,
    StoreError,
    StoreManifest,
    array_entry,
    is_complete,
    list_experiments,
    store_size,
)

__all__ = ["MANIFEST", "STORE_DTYPE", "StoreError", "StoreManifest", "array_entry", "is_complete",
           "list_experiments", "store_size"]
