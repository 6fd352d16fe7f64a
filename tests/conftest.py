"""Shared fixtures: no network, small CPU thread pools, one tiny synthetic dataset per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A 40-train / 8-test synthetic root at 48x64 with its 5 folds (shared; do not modify it)."""
    from kfold.data.layout import open_root
    from kfold.data.synthetic import generate
    from kfold.splits import ensure_folds

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, n_train=40, n_test=8, size=(48, 64), seed=0)
    root = open_root(out)
    ensure_folds(root, k=5, seed=42)
    return out
