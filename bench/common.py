"""Shared helpers of the bench scripts: flags, timing, result lines, the machine, fake OOF stores.

Every bench script runs both sides in one process and prints one result line per figure::

    metrics   confusion 50M px uint8       ours 0.110 s   sklearn 2.700 s   ratio 24.5x   identical=True

Sizes come in three modes: ``full`` (no flag), ``--quick`` (the whole suite in minutes on 2 cores) and
``--tiny`` (seconds: only keeps the scripts from rotting, the figures mean nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from foldwise.io import write_json, write_text
from kfold.data.layout import open_root
from kfold.data.synthetic import generate
from kfold.splits import ensure_folds, folds_sha256, read_folds
from kfold.store.format import STORE_DTYPE, TEST_MEAN, TEST_MEAN_RECORD, StoreManifest
from kfold.store.write import open_npy

MODES = ("full", "quick", "tiny")


def parse_args(description: str, argv: Sequence[str] | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--quick`` / ``--tiny`` (default: full sizes); ``args.mode`` is one of :data:`MODES`.

    Args:
        add_arguments: adds a script's own flags to the parser.
    """
    p = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="sizes for the whole suite in a few minutes")
    group.add_argument("--tiny", action="store_true", help="seconds; keeps the script from rotting")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a busy machine more threads wait on each other)")
    args = p.parse_args(argv)
    args.mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    return args


def pick(mode: str, full: Any, quick: Any, tiny: Any) -> Any:
    """The value of the current mode."""
    return {"full": full, "quick": quick, "tiny": tiny}[mode]


def best_time(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """(fastest wall time in seconds of ``repeat`` calls, the last result).

    The minimum, not the mean: on a shared machine other processes only ever add time.
    """
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def fmt_s(seconds: float) -> str:
    if seconds < 0.1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s" if seconds < 100 else f"{seconds:.0f} s"


def result(group: str, figure: str, ours: str, ref_name: str, ref: str, ratio: float | None = None,
           **extra: Any) -> str:
    """Print (and return) one result line: group, figure, ours, the reference, their ratio, extras."""
    parts = [f"{group:<9} {figure:<34}", f"ours {ours:<12}", f"{ref_name} {ref:<12}"]
    if ratio is not None:
        parts.append(f"ratio {ratio:.2f}x")
    parts += [f"{k}={v}" for k, v in extra.items()]
    line = "   ".join(parts)
    print(line, flush=True)
    return line


def note(text: str) -> None:
    """An explanatory line (not a figure), indented under the figures."""
    print(f"          # {text}", flush=True)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    """``N cores, <CPU model>, Python x.y`` from os.cpu_count and /proc/cpuinfo."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores, {model}, Python {platform.python_version()}"


def make_root(out: Path, n_train: int, size: tuple[int, int], seed: int = 0, n_test: int = 4,
              k: int | None = 5) -> Path:
    """A synthetic dataset root (``kfold.data.synthetic.generate``) with its folds.csv (none when k is None)."""
    generate(out, n_train=n_train, n_test=n_test, size=size, seed=seed, progress=False)
    if k is not None:
        ensure_folds(open_root(out), k=k, seed=42)
    return out


def fake_probs(labels: np.ndarray, skill: np.ndarray, confidence: float, rng: np.random.Generator,
               noise: float = 1.0) -> np.ndarray:
    """float16 (n, C, h, w) softmax probabilities of a model whose quality depends on the class.

    logits = confidence * (skill[label] * onehot(label) + noise * N(0, 1)): a class with high skill is
    usually right, one with low skill is a coin toss between classes. Different skill vectors make
    models complementary; different confidences make uniform weights favour the over-confident model,
    so the best blend is not the uniform one.

    Args:
        labels: (n, h, w) uint8 class ids (255 = ignore, drawn as a random class).
        skill: (C,) per-class margin of the true class.
        confidence: logit scale of this model.
        rng: noise generator.
        noise: standard deviation of the per-class logit noise.
    """
    C = len(skill)
    lab = labels.astype(np.int64)
    lab = np.where(lab >= C, rng.integers(0, C, size=lab.shape), lab)
    logits = noise * rng.standard_normal((lab.shape[0], C, *lab.shape[1:]), dtype=np.float32)
    np.put_along_axis(logits, lab[:, None], np.take_along_axis(logits, lab[:, None], 1) + skill[lab][:, None], 1)
    logits *= np.float32(confidence)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits.astype(np.float16)


def complementary_models(n_models: int, num_classes: int, seed: int = 0) -> list[tuple[np.ndarray, float]]:
    """(skill, confidence) per model: each is strong on its own third of the classes, weak elsewhere."""
    rng = np.random.default_rng(seed)
    models = []
    for m in range(n_models):
        strong = (np.arange(num_classes) % 3) == (m % 3)
        skill = np.where(strong, 2.5, 0.6) + 0.3 * rng.random(num_classes)
        confidence = (2.0, 0.7, 1.2, 1.0, 1.5, 0.8, 1.1, 0.9)[m % 8]
        models.append((skill.astype(np.float32), confidence))
    return models


def write_fake_experiment(runs: Path, name: str, root_path: Path, skill: np.ndarray, confidence: float,
                          seed: int, scale: float = 0.5, fold_test: bool = True, progress: bool = False) -> None:
    """One complete experiment store (every fold), in the on-disk format ``kfold.store.write`` writes.

    Probabilities come from :func:`fake_probs` on the labels nearest-downsampled to the store size.

    Args:
        fold_test: write each fold's ``test.npy``; False writes what ``oof.keep_fold_test false`` leaves
            behind instead: the experiment's float32 ``test_mean.npy`` and its record, no fold test stores
            (at NYUv2 size, 5 fold test stores per model would not fit on the disk).
        progress: a tqdm bar over the images written.
    """
    root = open_root(root_path, verify=False)
    folds, sha = read_folds(root), folds_sha256(root)
    k = max(folds.values()) + 1
    C, (H, W) = root.num_classes, root.image_size
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)

    def small(split: str, ids: Sequence[str]) -> np.ndarray:
        return np.stack([root.label(split, i)[rows[:, None], cols[None, :]] for i in ids])

    bar = tqdm(total=len(folds) + len(root.test_ids) * (k if fold_test else 1), desc=f"write {name}",
               unit="img", disable=not progress)

    def write_probs(path: Path, ids: Sequence[str], split: str, rng: np.random.Generator, dtype: str) -> None:
        with open_npy(path, (len(ids), C, h, w), dtype) as out:
            for start in range(0, len(ids), 32):  # row blocks, as predict.py streams batches
                part = ids[start : start + 32]
                out[start : start + len(part)] = fake_probs(small(split, part), skill, confidence, rng)
                bar.update(len(part))

    digests = []
    for f in range(k):
        rng = np.random.default_rng([seed, f])
        d = runs / name / f"fold{f}"
        val = sorted(i for i, g in folds.items() if g == f)
        write_probs(d / "oof.npy", val, "train", rng, STORE_DTYPE)
        if fold_test:
            write_probs(d / "test.npy", root.test_ids, "test", rng, STORE_DTYPE)
        # Without fold test stores, the digest a deleted store's manifest keeps names the fold for the mean.
        scores = {} if fold_test else {"test_sha256": hashlib.sha256(f"{name}/fold{f}".encode()).hexdigest()}
        digests.append({"sha256": scores.get("test_sha256")})
        for split, ids in (("oof", val), ("test", root.test_ids)):
            write_text(d / f"{split}_ids.txt", "".join(f"{i}\n" for i in ids))
        write_json(d / "manifest.json", StoreManifest.new(
            experiment=name, fold=f, k_folds=k, n_train=len(folds), classes=root.classes, image_size=(H, W),
            store_size=(h, w), oof_scale=scale, n_oof=len(val), n_test=len(root.test_ids),
            tta={"scales": [1.0], "hflip": False, "temperature": 1.0}, temperatures=[1.0], folds_sha256=sha,
            data_root=root.path, scores=scores).to_dict())
    if not fold_test:
        write_probs(runs / name / TEST_MEAN, root.test_ids, "test", np.random.default_rng([seed, k]), "float32")
        write_json(runs / name / TEST_MEAN_RECORD, {"folds": digests, "shape": [len(root.test_ids), C, h, w],
                                                    "dtype": "float32", "test_ids": list(root.test_ids)})
    bar.close()
