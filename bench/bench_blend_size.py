"""The blend at NYUv2 size: ``ensemble/blend.py --per-class`` on four generated experiments, against reading
their stores once.

Full size is NYUv2's: 795 train (OOF) and 654 test images with 480x640 labels, 13 classes, 4 models whose
stores are float16 at half scale (240x320), test stores as ``oof.keep_fold_test false`` leaves them (the
float32 fold mean only): 4 x (1.59 + 2.61) GB. ``--quick`` and ``--tiny`` shrink the image count and size.

Both sides start cold: every file of the stores and the data root is dropped from the page cache
(``posix_fadvise(DONTNEED)``, no root needed) before the sequential read (8 MiB blocks, like ``cat``) and
again before each blend. The blend runs as a user types it, in a subprocess, twice: first on stores without
kept member scores (every member scored at label resolution), then again with the scores the first one kept
beside the stores (``kfold.store.scores``; an experiment trained by kfold has them from its report). A thread samples
``/proc/<pid>/status`` of it and its children every 0.1 s for the peak anonymous memory (heap, summed over
the processes) and the peak resident file-mapped bytes (the stores' pages).

``--workdir DIR`` keeps the generated root and stores there (full size takes minutes to generate and
~17 GB of disk) and reuses them on the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from common import complementary_models, fmt_s, make_root, note, parse_args, pick, result, write_fake_experiment

REPO = Path(__file__).resolve().parents[1]
C, N_MODELS, GIB = 13, 4, 2**30


def add_arguments(p) -> None:
    p.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the generated data here")


def files_under(*folders: Path) -> Iterator[Path]:
    for folder in folders:
        yield from (p for p in sorted(folder.rglob("*")) if p.is_file())


def drop_page_cache(paths: Sequence[Path]) -> None:
    """Evict the files' pages from the page cache, so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_once(paths: Sequence[Path], block: int = 8 << 20) -> tuple[float, int]:
    """(seconds, bytes) of reading every file sequentially, block by block, into one reused buffer."""
    buffer, total = bytearray(block), 0
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return time.perf_counter() - t0, total


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/<pid>/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return pids


def _status_kib(pid: int, keys: Sequence[str]) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in keys}


def run_sampled(cmd: Sequence[str], env: dict[str, str]) -> tuple[float, int, int, subprocess.CompletedProcess]:
    """Run ``cmd``; return (wall seconds, peak anonymous bytes, peak file-mapped bytes, the process)."""
    peaks = {"RssAnon": 0, "RssFile": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while proc.poll() is None:
            totals = dict.fromkeys(peaks, 0)
            for pid in _tree(proc.pid):
                for k, v in _status_kib(pid, tuple(peaks)).items():
                    totals[k] += v * 1024
            for k in peaks:
                peaks[k] = max(peaks[k], totals[k])
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    return wall, peaks["RssAnon"], peaks["RssFile"], subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def generate(work: Path, n_train: int, n_test: int, size: tuple[int, int], progress: bool = True
             ) -> tuple[Path, Path]:
    """The data root and the four experiments' stores under ``work`` (reused when complete)."""
    root, runs, ready = work / "root", work / "runs", work / "ready.json"
    spec = {"n_train": n_train, "n_test": n_test, "size": list(size), "models": N_MODELS}
    if ready.is_file() and json.loads(ready.read_text()) == spec:
        return root, runs
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"error: {work} holds something other than this bench's data; use an empty folder")
    t0 = time.perf_counter()
    make_root(root, n_train, size, n_test=n_test)
    for m, (skill, confidence) in enumerate(complementary_models(N_MODELS, C)):
        write_fake_experiment(runs, f"model{m}", root, skill, confidence, seed=m + 1, fold_test=False,
                              progress=progress)
    ready.write_text(json.dumps(spec))
    note(f"generated {n_train} + {n_test} images {size[0]}x{size[1]} and {N_MODELS} experiments' stores "
         f"in {time.perf_counter() - t0:.0f} s")
    return root, runs


def run_case(work: Path, n_train: int, n_test: int, size: tuple[int, int], tiny: bool = False) -> None:
    root, runs = generate(work, n_train, n_test, size, progress=not tiny)
    stores = [p for p in files_under(runs) if p.suffix == ".npy"]
    drop_page_cache(list(files_under(runs, root)))
    t_read, n_bytes = read_once(stores)
    for p in runs.glob("*/store_scores.json"):  # the first blend scores every member itself
        p.unlink()
    tag = f"{N_MODELS} models x {n_train} + {n_test} images {size[0]}x{size[1]}"
    runs_to_time = (("first", "blend --per-class"), ("again", "again, member scores kept"))
    for run, label in runs_to_time[:1] if tiny else runs_to_time:  # tiny: the suite's check, one blend
        drop_page_cache(list(files_under(runs, root)))
        # tiny: one process (a pool's start-up would be most of the suite's check, and it is timed elsewhere)
        blend_once(work, runs, run, f"size {tag}: {label} vs read stores once", t_read, n_bytes,
                   ["--workers", "1"] if tiny else [])


def blend_once(work: Path, runs: Path, name: str, figure: str, t_read: float, n_bytes: int,
               extra: Sequence[str] = ()) -> None:
    """Run ``ensemble/blend.py --per-class`` as a user would and print its result line and timings."""
    out_dir = work / "submissions"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "ensemble/blend.py", "--runs-dir", str(runs), "--runs",
           *[f"model{m}" for m in range(N_MODELS)], "--per-class", "--out-dir", str(out_dir), "--name", name,
           *extra]
    wall, heap, mapped, proc = run_sampled(cmd, env)
    if proc.returncode != 0:
        raise RuntimeError(f"blend failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads((out_dir / f"{name}.json").read_text())
    result("blend", figure, fmt_s(wall), "read", fmt_s(t_read), wall / t_read, heap_peak_gib=f"{heap / GIB:.2f}",
           mapped_peak_gib=f"{mapped / GIB:.2f}", stores_gib=f"{n_bytes / GIB:.2f}",
           read_gib_s=f"{n_bytes / GIB / t_read:.2f}")
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in record["timings_s"].items())
    note(f"blend timings: {timings}; OOF mIoU {record['oof']['miou']:.4f} (nested {record['nested']['miou']:.4f}), "
         f"test mIoU {record['test']['miou']:.4f}; cpus {os.cpu_count()}, load average "
         f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv, add_arguments)
    n_train, n_test, size = pick(args.mode, (795, 654, (480, 640)), (120, 100, (240, 320)), (20, 8, (48, 64)))
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run_case(args.workdir, n_train, n_test, size, args.mode == "tiny")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_blend_size_") as tmp:
        run_case(Path(tmp), n_train, n_test, size, args.mode == "tiny")
    return 0


if __name__ == "__main__":
    sys.exit(main())
