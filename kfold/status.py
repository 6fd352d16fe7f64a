"""Where every fold stands, from the run folders alone: ``python -m kfold.status [--out runs] [EXP ...]``.

One row per experiment and fold: ``complete`` (OOF mIoU), ``running`` (epoch e/E, last validation mIoU, job),
``failed`` (the last error line and the log), ``pending`` (submitted, not started), ``corrupt`` (a record that
exists but cannot be read: ``job.json``, ``manifest.json`` or ``config.yaml``, named) or ``missing``. A job
record that says running or pending but whose process is gone (same host only) counts as failed: a SIGKILL or
an out-of-memory kill leaves no other trace. Exit code 1 when any fold failed or is corrupt; 2 for an
experiment name that is not under ``--out`` (the line names those that are). Torch-free.
"""

from __future__ import annotations

import csv
import json
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.io import pid_alive, read_text
from kfold.rundir import CONFIG, JOB, fold_dir, read_job_record
from kfold.store.format import MANIFEST, is_complete, list_experiments

STATES = ("complete", "running", "pending", "failed", "corrupt", "missing")
BAD = ("failed", "corrupt")


def _last_metrics(run_dir: Path) -> dict[str, str]:
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    return rows[-1] if rows else {}


def _recipe(run_dir: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load((run_dir / CONFIG).read_text())["recipe"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return {}


def _last_error(record: dict[str, Any]) -> str:
    if record.get("error"):
        return str(record["error"])
    for key in ("stderr", "stdout"):
        try:
            lines = [ln.strip() for ln in Path(record[key]).read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, KeyError, TypeError):
            continue
        errors = [ln for ln in lines if "Error" in ln or ln.startswith("error:")]
        if errors:
            return errors[-1]
    return ""


def _progress(run_dir: Path) -> str:
    metrics, recipe = _last_metrics(run_dir), _recipe(run_dir)
    schedule = recipe.get("schedule", {})
    unit, total = (("iteration", schedule.get("iterations", "?")) if schedule.get("unit") == "iterations"
                   else ("epoch", schedule.get("epochs", "?")))
    if not metrics:
        return f"{unit} 0/{total}"
    miou = metrics.get("val_miou")
    return f"{unit} {metrics.get(unit, '?')}/{total}" + (f", val mIoU {float(miou):.4f}" if miou else "")


def _corrupt_record(run_dir: Path) -> str | None:
    """``<file>: <why>`` for the first record of the fold that exists but cannot be read, else None."""
    for name, parse in ((MANIFEST, json.loads), (JOB, json.loads), (CONFIG, yaml.safe_load)):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            data = parse(read_text(path))
        except (OSError, ValueError, yaml.YAMLError) as err:
            why = " ".join(str(err).removeprefix(f"{path}: ").split())[:120]
            return f"{path}: {why}"
        if not isinstance(data, dict) or (name == CONFIG and not isinstance(data.get("recipe"), dict)):
            return f"{path}: not the record foldwise writes (expected a mapping)"
    return None


def fold_status(run_dir: Path) -> tuple[str, str]:
    """(state, detail) of one fold folder."""
    corrupt = _corrupt_record(run_dir)
    if corrupt:
        return "corrupt", corrupt
    if is_complete(run_dir):
        manifest = json.loads((run_dir / MANIFEST).read_text())
        miou = manifest.get("oof_miou")
        return "complete", f"OOF mIoU {miou:.4f}" if isinstance(miou, float) else "OOF mIoU n/a"
    record = read_job_record(run_dir)
    state, job = record.get("state"), record.get("job_id", "?")
    log = record.get("stderr", "")
    here = record.get("host") in (None, socket.gethostname())
    if state in ("running", "requeued"):
        if here and record.get("pid") and not pid_alive(record["pid"]) and state == "running":
            return "failed", f"job {job}: process {record['pid']} ended without a record (killed?); log {log}"
        return "running", f"{_progress(run_dir)}, job {job}" + (" (requeued)" if state == "requeued" else "")
    if state == "pending":
        if record.get("launcher") == "local" and not pid_alive(job):
            return "failed", f"job {job}: ended before it started; log {log}"
        return "pending", f"job {job}, submitted {record.get('submitted', '?')}"
    if state == "failed":
        return "failed", f"job {job}: {_last_error(record)}; log {log}"
    if state == "completed":
        return "failed", f"job {job} ended but {MANIFEST} is not complete; log {log}"
    if (run_dir / "last.pt").is_file():
        how = f"job {job} cancelled" if state == "cancelled" else "unfinished"
        return "missing", f"{how} ({_progress(run_dir)}); launch again to resume it"
    return "missing", ""


def k_folds(exp_dir: Path) -> int:
    """The experiment's fold count from any fold's recorded recipe (5 when nothing is recorded)."""
    for run_dir in sorted(exp_dir.glob("fold*")):
        k = _recipe(run_dir).get("data", {}).get("k_folds")
        if isinstance(k, int):
            return k
    return 5


def status_rows(out: Path, names: Sequence[str]) -> list[dict[str, Any]]:
    known = list_experiments(out)
    unknown = [n for n in names if n not in known]
    if unknown:
        where = f"experiments there: {', '.join(known)}" if known else "it holds no experiment"
        raise LookupError(f"{out}: no experiment {unknown[0]!r} ({where})")
    rows = []
    for name in names:
        for fold in range(k_folds(out / name)):
            state, detail = fold_status(fold_dir(out, name, fold))
            rows.append({"experiment": name, "fold": fold, "state": state, "detail": detail})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    width = max([len("experiment"), *(len(r["experiment"]) for r in rows)])
    lines = [f"{'experiment':<{width}}  fold  {'state':<8}  detail"]
    lines += [f"{r['experiment']:<{width}}  {r['fold']:>4}  {r['state']:<8}  {r['detail']}" for r in rows]
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m kfold.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="EXP", help="experiments (default: every one under --out)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="runs folder (default runs)")
    parser.add_argument("--watch", type=float, default=None, metavar="S", help="refresh every S seconds")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.watch is not None and args.watch <= 0:
            raise ValueError(f"--watch {args.watch}: must be > 0 seconds")
        names = args.names or list_experiments(args.out)
        if not names:
            raise FileNotFoundError(f"{args.out}: no experiments found")
        while True:
            rows = status_rows(args.out, names)
            if args.watch is not None:
                print("\033[H\033[J" + time.strftime("%H:%M:%S"), end="  ")
            print(format_rows(rows), flush=True)
            if args.watch is None:
                return 1 if any(r["state"] in BAD for r in rows) else 0
            time.sleep(args.watch)

    return run_entry_point(body, args.debug, interrupted="")


if __name__ == "__main__":
    sys.exit(main())
