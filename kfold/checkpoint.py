"""Checkpoints as plain dicts (``weights_only=True`` loadable), RNG states, weights and metrics files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn

from foldwise.io import atomic_path, write_text


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _plain(random.getstate()),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(obj):
    return [_plain(v) for v in obj] if isinstance(obj, tuple | list) else obj


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state) -> None:
    """``last.pt`` as a plain dict of tensors and numbers (loadable with ``weights_only=True``), atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp, metadata)


def write_metrics(path: Path, rows: list[dict]) -> None:
    write_text(path, pd.DataFrame(rows).to_csv(index=False))


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """Read ``last.pt`` with ``weights_only=True``; a file that carries pickled objects is refused."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({first})") from None
