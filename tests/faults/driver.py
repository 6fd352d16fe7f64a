"""Run a real entry point with one pause injected, so a test can SIGKILL it at a chosen point.

    python tests/faults/driver.py --marker FILE --pause WHAT:N -- SCRIPT [ARGS ...]

SCRIPT runs as ``__main__`` (``experiments/exp093_2.py``, ``ensemble/blend.py``) in this process with ARGS as
its command line; nothing in the project is changed, only wrapped here. At the N-th occurrence of WHAT the
driver touches FILE and sleeps until it is killed:

    loss  the N-th training loss (mid-epoch: earlier steps done, this one not)
    save  the N-th ``torch.save``: half of the serialised bytes are written to its (temporary) file first
    tta   the N-th TTA batch of fold prediction: earlier batches are in the ``.npy`` memmap, later ones not
    csv   the N-th submission CSV of ``submissions.writer``: half of its rows are written and flushed first
"""

from __future__ import annotations

import argparse
import io
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def pause(marker: Path) -> None:
    marker.touch()
    while True:  # until SIGKILL
        time.sleep(1)


def counter(n: int):
    """A callable that is True on its n-th call (1-based) and False otherwise."""
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == n

    return hit


def pause_loss(n: int, marker: Path) -> None:
    from kfold.losses import SegDepthLoss

    real, hit = SegDepthLoss.forward, counter(n)

    def forward(self, *args: Any, **kwargs: Any):
        if hit():
            pause(marker)
        return real(self, *args, **kwargs)

    SegDepthLoss.forward = forward


def pause_save(n: int, marker: Path) -> None:
    import torch

    real, hit = torch.save, counter(n)

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if hit():
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            pause(marker)
        real(obj, f, *args, **kwargs)

    torch.save = save


def pause_tta(n: int, marker: Path) -> None:
    import kfold.store.write

    real, hit = kfold.store.write.predict_tta, counter(n)

    def predict_tta(*args: Any, **kwargs: Any):
        if hit():
            pause(marker)
        return real(*args, **kwargs)

    kfold.store.write.predict_tta = predict_tta


def pause_csv(n: int, marker: Path) -> None:
    import csv

    import submissions.writer

    hit = counter(n)

    class HalfWriter:
        def __init__(self, f: io.TextIOBase, **kwargs: Any) -> None:
            self.f, self.writer, self.paused = f, csv.writer(f, **kwargs), hit()

        def writerow(self, row: list) -> None:
            self.writer.writerow(row)

        def writerows(self, rows: list) -> None:
            rows = list(rows)
            if not self.paused:
                self.writer.writerows(rows)
                return
            self.writer.writerows(rows[: len(rows) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            pause(marker)

    class CsvModule:  # csv as submissions.writer sees it; every other user keeps the real module
        def __getattr__(self, name: str) -> Any:
            return getattr(csv, name)

        writer = HalfWriter

    submissions.writer.csv = CsvModule()


PAUSES = {"loss": pause_loss, "save": pause_save, "tta": pause_tta, "csv": pause_csv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--marker", type=Path, required=True)
    parser.add_argument("--pause", required=True, help="WHAT:N with WHAT one of " + ", ".join(PAUSES))
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    what, n = args.pause.split(":")
    PAUSES[what](int(n), args.marker)
    script = str(REPO / args.script)
    sys.argv = [script, *args.args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
