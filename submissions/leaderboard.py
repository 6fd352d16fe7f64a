"""Leaderboard CSV: one row per single experiment and per blend.

    python -m submissions.leaderboard [--path P]             # print, ranked by nested then plain OOF mIoU
    python -m submissions.leaderboard --record-lb NAME SCORE  # store a public LB score

Columns: name, kind (experiment|blend), members, weights, temperatures, oof_miou, oof_miou_nested,
oof_miou_selected (a search's best trial, selection-corrected), pixel_acc, iou_<class>..., submission,
created (ISO time), notes, trackers (where the row's curves are), public_lb. List and dict values (members,
weights, temperatures) are stored as JSON text. Every read-modify-write holds an ``fcntl`` lock on
``<path>.lock`` (folds and blends may refresh the board at once) and the CSV is replaced atomically.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from foldwise.cli import ArgumentParser, run_entry_point
from foldwise.io import read_text
from foldwise.leaderboard import DEPTH, HEAD, KINDS, TAIL
from submissions.common import SubmissionError, atomic_path

DEFAULT_PATH = Path(__file__).resolve().parent / "leaderboard.csv"
NUMERIC = ("oof_miou", "oof_miou_nested", "oof_miou_selected", "pixel_acc", "public_lb", *DEPTH)
SHORT = ("name", "kind", "oof_miou_nested", "oof_miou", "oof_miou_selected", "pixel_acc", "public_lb", "submission",
         "created")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # A sibling lock file: the CSV itself is replaced by rename, so locking it would lock a stale inode.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def iou_columns(class_names: Sequence[str], iou: Sequence[float]) -> dict[str, float]:
    """``{"iou_<class>": value}`` for a leaderboard row."""
    if len(class_names) != len(iou):
        raise SubmissionError(f"{len(class_names)} class names but {len(iou)} IoU values")
    return {f"iou_{name}": float(v) for name, v in zip(class_names, iou)}


def _cell(key: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, (list, tuple, dict, np.ndarray)):
        value = value.tolist() if isinstance(value, np.ndarray) else value
        return json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
    text = str(value)
    if "\n" in text:
        raise SubmissionError(f"leaderboard value of {key!r} has a line break: {text!r}")
    return text


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The leaderboard's header and rows, read strictly: a malformed file is refused, never rewritten."""
    if not path.is_file():
        return [], []
    try:
        records = list(csv.reader(io.StringIO(read_text(path), newline=""), strict=True))
    except (ValueError, csv.Error) as err:
        raise SubmissionError(f"{path}: not a readable leaderboard ({str(err).removeprefix(f'{path}: ')})") from None
    if not records:
        return [], []
    header, body = records[0], records[1:]
    if "name" not in header:
        raise SubmissionError(f"{path}: not a leaderboard (no 'name' column; found {', '.join(header)})")
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise SubmissionError(f"{path}: column {duplicated[0]!r} appears twice in the header")
    for line, cells in enumerate(body, start=2):
        if len(cells) != len(header):
            raise SubmissionError(f"{path}: line {line} has {len(cells)} fields, the header {len(header)}; "
                                  "fix or remove the file (it is not rewritten)")
    return header, [dict(zip(header, cells)) for cells in body]


def _columns(header: list[str], keys: list[str]) -> list[str]:
    iou = [c for c in dict.fromkeys(header + keys) if c.startswith("iou_")]
    depth = [c for c in DEPTH if c in header or c in keys]
    return [*HEAD, *depth, *iou, *TAIL]


def _write_rows(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(rows)


def upsert_leaderboard(row: Mapping[str, object], path: str | os.PathLike = DEFAULT_PATH) -> Path:
    """Insert ``row`` or replace the row of the same name.

    A public LB score recorded earlier is kept unless ``row`` carries one. ``created`` defaults to now.

    Args:
        row: at least ``name`` and ``kind``; other keys among the leaderboard columns or ``iou_<class>``.
        path: the leaderboard CSV.

    Returns:
        the leaderboard path.
    """
    path = Path(path)
    name = str(row.get("name") or "")
    if not name:
        raise SubmissionError(f"{path}: leaderboard row needs a non-empty 'name'")
    if row.get("kind") not in KINDS:
        raise SubmissionError(
            f"{path}: row {name!r}: kind must be one of {', '.join(KINDS)}, got {row.get('kind')!r}"
        )
    unknown = [k for k in row if k not in HEAD + DEPTH + TAIL and not k.startswith("iou_")]
    if unknown:
        raise SubmissionError(f"{path}: row {name!r}: unknown column(s) {', '.join(unknown)}")
    cells = {k: _cell(k, v) for k, v in row.items()}
    cells.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    with _locked(path):
        header, rows = _read_rows(path)
        at = next((i for i, r in enumerate(rows) if r["name"] == name), None)
        if at is None:
            rows.append(cells)
        else:
            if not cells.get("public_lb"):
                cells["public_lb"] = rows[at].get("public_lb", "")
            rows[at] = cells  # keeps its place: the file stays in first-recorded order
        _write_rows(path, _columns(header, list(cells)), rows)
    return path


def record_public_lb(name: str, score: float, path: str | os.PathLike = DEFAULT_PATH) -> None:
    """Store the public LB score of the row ``name``."""
    path = Path(path)
    if not math.isfinite(score):
        raise SubmissionError(f"{path}: public LB score of {name!r} must be a finite number, got {score}")
    with _locked(path):
        header, rows = _read_rows(path)
        row = next((r for r in rows if r["name"] == name), None)
        if row is None:
            known = ", ".join(r["name"] for r in rows) or "none"
            raise SubmissionError(f"{path}: no leaderboard row named {name!r} (known: {known})")
        row["public_lb"] = repr(float(score))
        _write_rows(path, _columns(header, []), rows)


def read_leaderboard(path: str | os.PathLike = DEFAULT_PATH) -> pd.DataFrame:
    """The leaderboard as a DataFrame; score columns numeric (nan when blank), the rest strings."""
    path = Path(path)
    header, rows = _read_rows(path)
    df = pd.DataFrame(rows, columns=_columns(header, []) if header else list(HEAD + TAIL), dtype=object)
    for col in df.columns:
        if col in NUMERIC or col.startswith("iou_"):
            values = df[col].replace("", np.nan)
            try:
                df[col] = pd.to_numeric(values).astype(np.float64)
            except (ValueError, TypeError):
                raise SubmissionError(f"{path}: column {col!r} holds a non-number") from None
        else:
            df[col] = df[col].fillna("").astype(str)
    return df


def ranked(df: pd.DataFrame) -> pd.DataFrame:
    """Best first: by nested-CV OOF mIoU, then plain OOF mIoU; rows without scores last."""
    return df.sort_values(["oof_miou_nested", "oof_miou"], ascending=False, na_position="last", kind="stable")


def sync_experiment_rows(runs_dir: str | os.PathLike, path: str | os.PathLike = DEFAULT_PATH,
                         names: Sequence[str] | None = None) -> list[str]:
    """Upsert the row every experiment report left in ``<runs_dir>/<exp>/leaderboard_row.json``.

    Experiment reports are written by ``kfold``, which must not import this package; they leave their row
    as JSON and the leaderboard picks it up here.

    Args:
        runs_dir: the runs folder.
        path: the leaderboard CSV.
        names: only these experiments (default: every one with a row file).

    Returns:
        The names of the experiments whose rows were upserted.
    """
    synced = []
    runs_dir = Path(runs_dir)
    # Experiments are runs/<name>/, search trials runs/<study>/<trial>/.
    for row_file in sorted([*runs_dir.glob("*/leaderboard_row.json"), *runs_dir.glob("*/*/leaderboard_row.json")]):
        if names is not None and row_file.parent.relative_to(runs_dir).as_posix() not in names:
            continue
        try:
            row = json.loads(row_file.read_text())
        except ValueError as e:
            raise SubmissionError(f"{row_file}: not valid JSON ({e})") from None
        upsert_leaderboard(row, path)
        synced.append(str(row.get("name", row_file.parent.name)))
    return synced


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m submissions.leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help=f"leaderboard CSV (default {DEFAULT_PATH})")
    parser.add_argument("--record-lb", nargs=2, metavar=("NAME", "SCORE"), help="store a public LB score")
    parser.add_argument("--all", action="store_true", help="print every column (per-class IoU included)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="pick up experiment reports from here first (default runs)")
    args = parser.parse_args(argv)
    return run_entry_point(lambda: _record_or_print(args), args.debug)


def _record_or_print(args) -> None:
    if args.record_lb:
        name, text = args.record_lb
        try:
            score = float(text)
        except ValueError:
            raise SubmissionError(f"--record-lb {name}: score {text!r} is not a number") from None
        record_public_lb(name, score, args.path)
        print(f"{args.path}: {name} public_lb = {score}")
        return
    sync_experiment_rows(args.runs_dir, args.path)
    df = read_leaderboard(args.path)
    if df.empty:
        print(f"{args.path}: empty leaderboard")
        return
    df = ranked(df)
    if not args.all:
        df = df[list(SHORT)]
    options = ("display.width", 200, "display.max_columns", None, "display.float_format", "{:.4f}".format)
    with pd.option_context(*options):
        print(df.to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
