"""The members of a blend: their OOF / test stores read together, a pixel sample, full-resolution scoring.

Stores are never held whole: every pass streams chunks of images, all members' chunks for the same ids at
once. Blends follow the mIoU convention: probabilities are re-tempered and weighted at the store
resolution, then upsampled bilinearly (align_corners=False) to the label size before the argmax.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ensemble.optimize import TemperedCache, blend_probs
from ensemble.sampling import gather_pixels, stratified_pixel_sample
from foldwise.io import read_text
from kfold.data.layout import DataRoot, open_root
from kfold.splits import FOLDS_FILE, folds_sha256
from kfold.store.format import MANIFEST, StoreError, fold_dirs, list_experiments
from kfold.store.read import ExperimentStore, full_res_argmax, open_experiment
from kfold.store.write import write_test_mean

Params = tuple[Sequence[float], Sequence[float]]  # (weights, temperatures), one per member


def blend_grid(store_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Resolution members are blended at: the largest store size (every store's, when they agree)."""
    return max((tuple(hw) for hw in store_sizes), key=lambda hw: hw[0] * hw[1])  # type: ignore[return-value]


def to_grid(probs: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Probabilities (n, C, h, w) resized bilinearly to ``grid`` (unchanged when already there)."""
    t = torch.as_tensor(probs)
    if tuple(t.shape[-2:]) != tuple(grid):
        t = F.interpolate(t, size=tuple(grid), mode="bilinear", align_corners=False)
    return t


@dataclass
class Members:
    """Compatible experiment stores (same folds, classes, ids, image size, test ids) and their data root."""

    stores: list[ExperimentStore]
    root: DataRoot
    runs_dir: Path  # with the names and the root's path: what a worker process needs to open them again

    def reopen_args(self) -> tuple[str, list[str], str]:
        """``open_members`` arguments that open these members again (in a worker process)."""
        return str(self.runs_dir), self.names, str(self.root.path)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stores]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.stores[0].classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def folds(self) -> int:
        return self.stores[0].folds

    @property
    def ids(self) -> tuple[str, ...]:
        return self.stores[0].ids

    @property
    def fold_of(self) -> dict[str, int]:
        return self.stores[0].fold_of

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.stores[0].image_size)  # type: ignore[return-value]

    @property
    def grid(self) -> tuple[int, int]:
        """Resolution the members are blended at (see :func:`blend_grid`)."""
        return blend_grid([tuple(s.store_size) for s in self.stores])

    @property
    def test_ids(self) -> tuple[str, ...]:
        return self.stores[0].test_ids

    def on_grid(self, probs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Probabilities (n, C, h, w) on the blend grid (see :func:`to_grid`)."""
        return to_grid(probs, self.grid)

    def iter_oof(
        self, chunk: int, ids: Sequence[str] | None = None, on_grid: bool = True
    ) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        """Yield ``(ids, [probs per member])``: float32 (n, C, h, w), ``chunk`` images at a time.

        Args:
            chunk: images per step. ids: train ids in this order (default: all, sorted).
            on_grid: resize every member to the blend grid (else each stays at its store size).
        """
        iters = [s.iter_oof(chunk, ids, check=True) for s in self.stores]
        for parts in zip(*iters):
            yield parts[0][0], [self.on_grid(p) if on_grid else torch.from_numpy(p) for _, p in parts]

    def iter_test(self, chunk: int, rows: range | None = None, on_grid: bool = True
                  ) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        """Yield ``(ids, [probs per member])``: each member's test probabilities averaged over its folds
        (test rows ``rows``, default all; on the blend grid, or each at its store size)."""
        iters = [s.iter_test(chunk, check=True, rows=rows) for s in self.stores]
        for parts in zip(*iters):
            yield parts[0][0], [self.on_grid(p) if on_grid else torch.from_numpy(p) for _, p in parts]

    def labels(self, ids: Sequence[str], split: str = "train") -> np.ndarray:
        """Full-resolution labels (n, H, W) uint8 of ``ids``; a size other than the stores' is a StoreError."""
        labels = np.stack([self.root.label(split, i) for i in ids])
        if labels.shape[1:] != self.image_size:
            raise StoreError(f"{self.root.label_path(split, ids[0])}: size {labels.shape[1:]} differs from the "
                             f"stores' image size {self.image_size}")
        return labels


def _with_test_mean(runs_dir: str | Path, store: ExperimentStore) -> ExperimentStore:
    write_test_mean(store)
    return open_experiment(runs_dir, store.name)


def check_compatible(stores: Sequence[ExperimentStore]) -> None:
    """Raise a one-line StoreError unless every store shares folds, classes, ids, image size and test ids."""
    ref = stores[0]
    for s in stores[1:]:
        where = f"{s.name} vs {ref.name}:"
        if s.folds_sha256 != ref.folds_sha256:
            raise StoreError(f"{where} different folds.csv (sha256 {s.folds_sha256[:12]}... vs "
                             f"{ref.folds_sha256[:12]}...); blend only experiments trained on the same folds")
        if s.folds != ref.folds or s.fold_of != ref.fold_of:
            raise StoreError(f"{where} different folds ({s.folds} vs {ref.folds} folds or another id -> fold map)")
        if s.classes != ref.classes:
            raise StoreError(f"{where} different classes {list(s.classes)} vs {list(ref.classes)}")
        if tuple(s.image_size) != tuple(ref.image_size):
            raise StoreError(f"{where} different image size {tuple(s.image_size)} vs {tuple(ref.image_size)}")
        if s.test_ids != ref.test_ids:
            raise StoreError(f"{where} different test ids ({len(s.test_ids)} vs {len(ref.test_ids)})")


def _looks_complete(exp_dir: Path) -> bool:
    """Every one of the experiment's k folds has a manifest (k as its manifests record it)."""
    with_manifest = {k: d for k, d in fold_dirs(exp_dir).items() if (d / MANIFEST).is_file()}
    for d in with_manifest.values():
        try:
            k = json.loads(read_text(d / MANIFEST))["k_folds"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return isinstance(k, int) and set(with_manifest) >= set(range(k))
    return bool(with_manifest) and len(with_manifest) == len(fold_dirs(exp_dir))


def open_members(
    runs_dir: str | Path, names: Sequence[str] | None = None, data_root: str | Path | None = None,
    make_test_mean: bool = False, skip_broken: bool = False,
) -> tuple[Members, list[str]]:
    """Open and cross-check the stores of a blend.

    Args:
        runs_dir: folder of the experiments.
        names: experiments to blend; None: every complete experiment under ``runs_dir``. One still training (a
            fold without its manifest) is skipped and reported; one whose every fold has a manifest but whose
            stores cannot be read is refused, naming the experiment, fold and file, unless ``skip_broken``.
        data_root: the dataset root; default: the one the stores recorded.
        make_test_mean: write the fold-mean test store of a member that has none (stores written before it
            existed); it is kept, so the next blend reads one file instead of k.

    Returns:
        (members, one line per skipped experiment). Any problem is a one-line StoreError.
    """
    skipped: list[str] = []
    if names:
        if len(set(names)) != len(names):
            raise StoreError(f"--runs lists an experiment twice: {list(names)}")
        stores = [open_experiment(runs_dir, n) for n in names]
    else:
        stores = []
        for n in list_experiments(runs_dir):
            try:
                stores.append(open_experiment(runs_dir, n))
            except StoreError as err:
                broken = _looks_complete(Path(runs_dir) / n)
                if broken and not skip_broken:
                    raise StoreError(f"{err} (it looks complete: fix it, name the members with --runs, or pass "
                                     "--skip-broken to blend without it)") from None
                skipped.append(f"skipped {'broken ' if broken else ''}{err}")
        if not stores:
            raise StoreError(f"{runs_dir}: no complete experiment (fold<k>/manifest.json with status complete)")
    if make_test_mean:
        stores = [s if s.test_mean is not None else _with_test_mean(runs_dir, s) for s in stores]
    check_compatible(stores)
    ref = stores[0]
    path = data_root if data_root is not None else ref.data_root
    if not path:
        raise StoreError(f"{ref.name}: the manifests record no data_root; pass --data-root")
    root = open_root(path, verify=False, class_map=ref.class_map)
    if root.classes != ref.classes:
        raise StoreError(f"{root.path}: classes {list(root.classes)} differ from {ref.name}'s {list(ref.classes)}")
    if (root.path / FOLDS_FILE).is_file() and folds_sha256(root) != ref.folds_sha256:
        raise StoreError(f"{root.path / FOLDS_FILE}: sha256 differs from the folds {ref.name} was trained on")
    missing = sorted(set(ref.ids) - set(root.train_ids))
    if missing:
        raise StoreError(f"{root.path}: train id {missing[0]!r} of {ref.name} has no image in this root")
    return Members(stores, root, Path(runs_dir)), skipped


@dataclass
class PixelSample:
    """A fixed, class-stratified sample of OOF pixels on the blend grid, held in RAM.

    Args:
        probs: per member (P, C) float32 probabilities. labels: (P,) int64.
        weights: (P,) population / sample class counts. fold: (P,) fold of each pixel's image.
    """

    probs: list[np.ndarray]
    labels: np.ndarray
    weights: np.ndarray
    fold: np.ndarray


def _progress(chunks: Iterator, n_images: int, chunk: int, desc: str) -> Iterator:
    """A tqdm bar over streamed chunks, counted in images; off when stderr is not a terminal."""
    return tqdm(chunks, desc=desc, total=-(-n_images // chunk), unit="chunk", leave=False, disable=None,
                postfix={"images": n_images})


def nearest_rows(out_size: int, in_size: int) -> np.ndarray:
    """Full-resolution row (or column) under the centre of each of ``out_size`` grid cells."""
    return np.minimum(((np.arange(out_size) + 0.5) * in_size / out_size).astype(np.int64), in_size - 1)


def build_sample(members: Members, n_pixels: int, seed: int, chunk: int) -> PixelSample:
    """Sample labelled pixels at the blend grid, stratified by class, and gather every member's probabilities.

    The label of a grid pixel is the full-resolution label under its centre (nearest downsampling).

    Args:
        members: the blend's stores.
        n_pixels: sample budget (``stratified_pixel_sample``).
        seed: sample seed.
        chunk: images per streamed chunk.
    """
    (h, w), (H, W) = members.grid, members.image_size
    rows, cols = nearest_rows(h, H), nearest_rows(w, W)
    ids = list(members.ids)
    small = np.empty((len(ids), h, w), dtype=np.uint8)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        small[start : start + len(part)] = members.labels(part)[:, rows[:, None], cols[None, :]]
    index, weights = stratified_pixel_sample(small, members.num_classes, n_pixels, seed)
    labels = small.reshape(-1)[index].astype(np.int64)
    image = index // (h * w)
    fold = np.asarray([members.fold_of[ids[i]] for i in image], dtype=np.int64)
    probs = [np.empty((len(index), members.num_classes), dtype=np.float32) for _ in members.stores]
    bounds = np.searchsorted(image, np.arange(0, len(ids) + chunk, chunk))
    chunks = _progress(members.iter_oof(chunk, ids), len(ids), chunk, "blend: sample OOF pixels")
    for k, (_, chunk_probs) in enumerate(chunks):
        lo, hi = bounds[k], bounds[k + 1]
        local = index[lo:hi] - k * chunk * h * w
        for m, p in enumerate(chunk_probs):
            probs[m][lo:hi] = gather_pixels(p.numpy(), local, (h, w))
    return PixelSample(probs=probs, labels=labels, weights=weights, fold=fold)


def blend_on_grid(probs: Sequence[torch.Tensor], params: Params, tempered: TemperedCache | None = None
                  ) -> torch.Tensor:
    """The blend's probabilities (n, C, h, w) on the grid: each member tempered and weighted.

    Args:
        tempered: a cache of ``probs`` re-tempered, shared by several blends of them (same values).
    """
    weights, temps = params
    return blend_probs(list(probs), list(weights), list(temps), axis=1, tempered=tempered)


def blend_argmax(probs: Sequence[torch.Tensor], params: Params, size: tuple[int, int],
                 tempered: TemperedCache | None = None) -> torch.Tensor:
    """Class ids (n, H, W) uint8 of a blend: blended on the grid, upsampled bilinearly, argmax."""
    return full_res_argmax(blend_on_grid(probs, params, tempered), size)
