"""OOF store: bytes per image, write and chunked-read throughput, and peak memory while scoring.

* bytes per image: a written ``oof.npy`` (float16 at half scale, as ``kfold.store.write`` stores it) against
  float32 probabilities at full label resolution;
* write: ``kfold.store.write.open_npy`` filled batch by batch (how ``predict_fold`` streams rows; flushed and
  renamed) against one ``np.save`` of the same array;
* read: ``ExperimentStore.iter_oof`` (memory-mapped, chunk by chunk, float32 out; with and without the
  value checks) against ``np.load`` of the same files. Both read from the page cache (files just written);
* peak memory, each in a fresh subprocess: ``kfold.store.read.score_experiment`` on a store at least four chunks
  large against loading the whole store with ``np.load`` and scoring it in memory. Reported: the peak
  growth of anonymous memory (heap; sampled every millisecond) and of the whole resident set (exact
  ``VmHWM`` after a reset, including the store's pages mapped by the memmap, which the kernel can drop).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from common import best_time, complementary_models, make_root, parse_args, pick, result, write_fake_experiment

from kfold.data.layout import open_root
from kfold.metrics import confusion_matrix, mean_iou
from kfold.store.read import full_res_argmax, open_experiment, score_experiment
from kfold.store.write import open_npy

C = 13
MB = 2**20


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakSampler(threading.Thread):
    """Samples RssAnon every millisecond and keeps the maximum (kB)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = _status_kb("RssAnon"), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _status_kb("RssAnon"))
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, _status_kb("RssAnon"))


def peak_child(how: str, runs: str, root_path: str, chunk: int) -> int:
    """Score the store ``how`` = ours | np_load; print peak memory growth (MB) and the mIoU as JSON."""
    store, root = open_experiment(runs, "exp"), open_root(root_path, verify=False)
    anon0, rss0 = _status_kb("RssAnon"), _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        exact = True
    except OSError:
        exact = False
    sampler = PeakSampler()
    sampler.start()
    if how == "ours":
        miou = score_experiment(store, root, chunk=chunk)["miou"]
    else:
        ids = [i for fa in store.fold_arrays for i in fa.oof_ids]
        probs = np.concatenate([np.load(fa.path / fa.manifest.oof["file"]) for fa in store.fold_arrays])
        labels = np.stack([root.label("train", i) for i in ids])
        pred = full_res_argmax(torch.from_numpy(probs), store.image_size).numpy()
        miou = mean_iou(confusion_matrix(labels, pred, C))
    anon_peak = sampler.stop()
    hwm = _status_kb("VmHWM") if exact else None
    print(json.dumps({"anon_mb": (anon_peak - anon0) / 1024, "rss_mb": None if hwm is None else (hwm - rss0) / 1024,
                      "miou": miou}))
    return 0


def run_peak(how: str, runs: Path, root: Path, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--peak", how, str(runs), str(root), str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--peak"]:
        return peak_child(argv[1], argv[2], argv[3], int(argv[4]))
    args = parse_args(__doc__.split("\n\n")[0], argv)
    n, size, chunk = pick(args.mode, (2000, (240, 320), 64), (400, (192, 256), 16), (20, (32, 48), 4))
    repeat = pick(args.mode, 3, 3, 1)
    with tempfile.TemporaryDirectory(prefix="bench_oof_") as tmp:
        tmp = Path(tmp)
        root = make_root(tmp / "root", n, size)
        skill, confidence = complementary_models(1, C)[0]
        write_fake_experiment(tmp / "runs", "exp", root, skill, confidence, seed=1)
        store = open_experiment(tmp / "runs", "exp")
        (H, W), (h, w) = store.image_size, store.store_size
        files = [fa.path / fa.manifest.oof["file"] for fa in store.fold_arrays]
        store_bytes = sum(f.stat().st_size for f in files)
        full32 = C * H * W * 4
        result("oof", f"bytes/image, store {h}x{w} f16", f"{store_bytes / n / 1024:.1f} KiB", "float32 full-res",
               f"{full32 / 1024:.1f} KiB", full32 / (store_bytes / n), images=n, image=f"{H}x{W}")

        array = np.concatenate([np.load(f) for f in files])
        mb = array.nbytes / MB

        def write_ours() -> None:
            with open_npy(tmp / "ours.npy", array.shape) as out:
                for start in range(0, len(array), 16):  # predict_fold writes one loader batch at a time
                    out[start : start + 16] = array[start : start + 16]

        def save_fsync() -> None:
            with open(tmp / "plain.npy", "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())

        t_ours, _ = best_time(write_ours, repeat)
        t_ref, _ = best_time(lambda: np.save(tmp / "plain.npy", array), repeat)
        t_sync, _ = best_time(save_fsync, repeat)
        result("oof", f"write {mb:.1f} MB", f"{mb / t_ours:.0f} MB/s", "np.save", f"{mb / t_ref:.0f} MB/s",
               t_ref / t_ours, np_save_fsync=f"{mb / t_sync:.0f}MB/s", note="ours_fsyncs_then_renames")

        def read_ours(check: bool) -> None:
            for _ in store.iter_oof(chunk, check=check):
                pass

        t_ref, _ = best_time(lambda: [np.load(f) for f in files], repeat)
        t_ref32, _ = best_time(lambda: [np.load(f).astype(np.float32) for f in files], repeat)
        for check in (False, True):
            t_ours, _ = best_time(lambda check=check: read_ours(check), repeat)
            result("oof", f"read {mb:.1f} MB, chunk {chunk}, check={check}", f"{mb / t_ours:.0f} MB/s", "np.load",
                   f"{mb / t_ref:.0f} MB/s", t_ref / t_ours, np_load_astype_f32=f"{mb / t_ref32:.0f}MB/s",
                   note="ours_yields_float32")

        ours, ref = run_peak("ours", tmp / "runs", root, chunk), run_peak("np_load", tmp / "runs", root, chunk)
        n_chunks = -(-n // chunk)
        rss = "n/a" if ours["rss_mb"] is None else f"{ours['rss_mb']:.0f}MB"
        rss_ref = "n/a" if ref["rss_mb"] is None else f"{ref['rss_mb']:.0f}MB"
        result("oof", f"peak heap scoring {mb:.1f} MB store", f"{ours['anon_mb']:.0f} MB", "np.load",
               f"{ref['anon_mb']:.0f} MB", ref["anon_mb"] / max(ours["anon_mb"], 1e-9),
               chunks=n_chunks, peak_rss_incl_mapped=f"{rss}/{rss_ref}",
               same_miou=bool(abs(ours["miou"] - ref["miou"]) < 1e-12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
