"""What each tracker adds to a fresh install: the packages it pulls in beyond the rest of requirements.txt, their
size on disk, and the time to import it in a new process.

Read from the installed distributions' metadata (``importlib.metadata``: each package's requirements and its
RECORD of files), so it measures the environment it runs in; run it in the project's ``.venv``:

    .venv/bin/python bench/bench_install.py
    .venv/bin/pip install --target /tmp/mlflow_full mlflow
    .venv/bin/python bench/bench_install.py --also /tmp/mlflow_full   # ... beside what that install would add
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
TRACKERS = {"tensorboard": (["tensorboard"], "from torch.utils.tensorboard import SummaryWriter"),
            "mlflow": (["mlflow-skinny", "sqlalchemy", "alembic"], "from mlflow.tracking import MlflowClient"),
            "wandb": (["wandb"], "import wandb")}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need, themselves included (extras and other platforms' markers off)."""
    seen, todo = set(), [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def size_mb(names: set[str]) -> float:
    total = 0
    for name in names:
        for file in metadata.distribution(name).files or []:
            path = Path(file.locate())
            if path.is_file():
                total += path.stat().st_size
    return total / 2**20


def import_s(statement: str) -> float:
    """Wall time of a new interpreter that only runs ``statement`` (less one that runs nothing)."""
    def timed(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - t0

    return min(timed(statement) for _ in range(3)) - min(timed("pass") for _ in range(3))


def added_from(folder: Path, base: set[str]) -> tuple[int, float]:
    """(packages, MB) of the distributions installed in ``folder`` (``pip install --target``) that ``base`` lacks."""
    count, total = 0, 0
    for dist in metadata.distributions(path=[str(folder)]):
        if canonical(dist.metadata["Name"]) in base:
            continue
        count += 1
        total += sum((folder / f).stat().st_size for f in dist.files or [] if (folder / f).is_file())
    return count, total / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--also", type=Path, help="a folder of another install (pip install --target) to set beside")
    args = p.parse_args(argv)
    tracker_names = {canonical(n) for names, _ in TRACKERS.values() for n in names}
    lines = (REPO / "requirements.txt").read_text().splitlines()
    base_names = [Requirement(line).name for line in lines if line.strip() and not line.startswith("#")]
    base = closure([n for n in base_names if canonical(n) not in tracker_names])
    print(f"base (requirements.txt without the trackers): {len(base)} packages, {size_mb(base):.0f} MB")
    everything: set[str] = set()
    for tracker, (names, statement) in TRACKERS.items():
        added = closure(names) - base
        everything |= added
        print(f"{tracker:<12} adds {len(added):>3} packages, {size_mb(added):>6.1f} MB; "
              f"import {import_s(statement):.2f} s   ({', '.join(sorted(added))})")
    print(f"{'all three':<12} adds {len(everything):>3} packages, {size_mb(everything):>6.1f} MB")
    if args.also:
        count, mb = added_from(args.also, base)
        print(f"{args.also.name:<12} adds {count:>3} packages, {mb:>6.1f} MB (installed apart with pip --target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
