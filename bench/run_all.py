"""Run every bench script and print their result lines, with the machine and the load around each script.

Usage (from the repo root):
    python bench/run_all.py --quick             # the whole suite in a few minutes on 2 cores
    python bench/run_all.py --tiny              # seconds: what tests/test_bench.py runs
    python bench/run_all.py --only blend tta    # some scripts (full sizes unless --quick / --tiny)

The scripts run one after the other in this process (importing torch and smp once saves seconds per
script); each is also usable alone with the same flags, e.g. ``python bench/bench_tta.py --quick``.
Exit status 1 when a script fails (its traceback is printed and the others still run).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime

from common import load_average, machine

NAMES = ("blend", "blend_size", "argmax", "tta", "metrics", "train_loop", "oof_store", "data", "scaling", "predict",
         "trackers")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/run_all.py", description=__doc__.split("\n\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="sizes for the whole suite in a few minutes")
    group.add_argument("--tiny", action="store_true", help="seconds; keeps the scripts from rotting")
    p.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=f"some of: {', '.join(NAMES)}")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every script (default 1)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    flags = (["--quick"] if args.quick else ["--tiny"] if args.tiny else []) + ["--threads", str(args.threads)]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    print(f"# machine: {machine()}", flush=True)
    print(f"# command: python bench/run_all.py {' '.join(argv if argv is not None else sys.argv[1:])}", flush=True)
    print(f"# started {datetime.now(UTC).isoformat(timespec='seconds')}, load average {load_average()}", flush=True)
    failed, start = [], time.perf_counter()
    for name in args.only or NAMES:
        print(f"## bench_{name}.py {' '.join(flags)}   (load average {load_average()})", flush=True)
        t0 = time.perf_counter()
        try:
            rc = importlib.import_module(f"bench_{name}").main(flags)
        except Exception:  # noqa: BLE001 - report and go on with the other scripts
            traceback.print_exc()
            rc = 1
        if rc:
            failed.append(name)
        print(f"## bench_{name}.py: {time.perf_counter() - t0:.1f} s, rc {rc}, load average {load_average()}",
              flush=True)
    status = f"FAILED: {', '.join(failed)}" if failed else "all passed"
    print(f"# total {time.perf_counter() - start:.1f} s, load average {load_average()}; {status}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
