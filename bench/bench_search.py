"""What pruning saves: one smoke search run with each pruner and without, side by side in one run.

Every side uses Optuna's random sampler with the same seed, so the trials propose the same recipes in the same
order and differ only in what the pruner stopped. Figures: fold jobs trained against the unpruned search, the
share saved, and whether the pruned search found the same best trial. Each search runs as the user types it
(``python -m kfold.search ... --launcher none``), in its own runs folder.

    python bench/bench_search.py --quick      # 8 trials x 5 folds of the smoke recipe, 1 epoch each
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import make_root, parse_args, pick, result

REPO = Path(__file__).resolve().parents[1]
SPACE = "optim.lr: {float: [1.0e-5, 3.0e-2], log: true}\nloss.depth_weight: {float: [0.0, 0.5]}\n"
SIDES = (("none", []), ("wilcoxon", ["--prune-p", "0.1"]), ("wilcoxon p<0.15", ["--prune-p", "0.15"]),
         ("median", []))


def run_search(root: Path, out: Path, space: Path, trials: int, pruner: str, extra: list[str]) -> tuple[float, dict]:
    """(seconds, {trial number: (state, folds trained, value)}) of one search."""
    import optuna

    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "kfold.search", "exp093_2", "--space", str(space), "--trials", str(trials),
           "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--study", "b", "--sampler", "random",
           "--pruner", pruner.split()[0], *extra, "--opts", "schedule.epochs", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"search failed: {proc.stderr[-2000:]}")
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name="b", storage=f"sqlite:///{out / 'b' / 'study.db'}")
    return seconds, {t.number: (t.state.name, len(t.intermediate_values), t.value) for t in study.get_trials()}


def best(trials: dict) -> int:
    complete = {n: v for n, (state, _, v) in trials.items() if state == "COMPLETE"}
    return max(complete, key=complete.get)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    n_train, trials = pick(args.mode, (40, 12), (24, 8), (16, 3))
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        root = make_root(Path(tmp) / "root", n_train, (48, 64))
        space = Path(tmp) / "space.yaml"
        space.write_text(SPACE)
        runs = {name: run_search(root, Path(tmp) / f"runs_{i}", space, trials, name, extra)
                for i, (name, extra) in enumerate(SIDES)}
    base_s, base = runs["none"]
    base_folds = sum(f for _, f, _ in base.values())
    for name, (seconds, found) in runs.items():
        if name == "none":
            continue
        folds = sum(f for _, f, _ in found.values())
        pruned = sum(state == "PRUNED" for state, _, _ in found.values())
        result("search", f"{name}: fold jobs, {trials} trials", str(folds), "unpruned", str(base_folds), None,
               saved=f"{100 * (1 - folds / base_folds):.0f}%", pruned_trials=pruned,
               same_best=best(found) == best(base), wall=f"{seconds:.0f}s/{base_s:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
