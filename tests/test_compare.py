"""``python -m ensemble.compare`` on fake stores whose quality is known: a real gain on every fold is called one,
two stores of the same quality are not told apart, stores of other folds are refused."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faults.stores import write_store
from scipy import stats

from ensemble.compare import Paired, Scored, holm, paired_tests, smallest_wilcoxon_p

REPO = Path(__file__).resolve().parents[1]
e2e = pytest.mark.e2e  # the command in a subprocess: the e2e tier


def right_on(share: float):
    """Probabilities peaked on the label for ``share`` of the pixels, on a random class elsewhere."""

    def probs(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
        lab = np.where(labels == 255, 0, np.minimum(labels, num_classes - 1))
        guess = np.where(rng.random(labels.shape) < share, lab, rng.integers(0, num_classes, labels.shape))
        onehot = np.moveaxis(np.eye(num_classes)[guess], -1, 1)
        return (onehot * 0.7 + (1 - onehot) * 0.3 / (num_classes - 1)).astype(np.float16)

    return probs


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "runs"
    write_store(out, "weak", synthetic_root, seed=1, probs=right_on(0.5))
    write_store(out, "weak_again", synthetic_root, seed=2, probs=right_on(0.5))
    write_store(out, "strong", synthetic_root, seed=3, probs=right_on(0.8))
    write_store(out, "other_folds", synthetic_root, seed=4, probs=right_on(0.8), folds_sha256_override="0" * 64)
    return out


def compare(runs: Path, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ensemble.compare", *names, "--runs-dir", str(runs), "--out-dir",
                           str(runs.parent / "subs")], cwd=REPO, capture_output=True, text=True, timeout=120)


@e2e
def test_a_gain_on_every_fold_is_called_better(runs) -> None:
    proc = compare(runs, "weak", "strong")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    fold_rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert len(fold_rows) == 5 and all(float(r[3]) > 0 for r in fold_rows)  # strong - weak on each fold
    assert "paired t p=" in out and "Wilcoxon signed-rank p=0.0625" in out and "corrected paired t p=" in out
    assert "verdict: strong is better than weak" in out
    assert "test " in out  # the root has test labels: the local test score row
    assert (runs.parent / "subs" / "plots" / "compare_weak_vs_strong.png").is_file()


@e2e
def test_two_stores_of_one_quality_are_not_told_apart(runs) -> None:
    proc = compare(runs, "weak", "weak_again")
    assert proc.returncode == 0, proc.stderr
    assert "verdict: 5 folds cannot tell weak_again from weak" in proc.stdout


@e2e
def test_stores_of_other_folds_are_refused_in_one_line(runs) -> None:
    proc = compare(runs, "weak", "other_folds")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "different folds.csv" in lines[0] and "other_folds" in lines[0]


@pytest.mark.parametrize("names, message", [(["weak"], "at least two"), (["weak", "weak"], "twice"),
                                            (["weak", "nosuch"], "nosuch: neither an experiment")])
def test_bad_names_are_one_error_line(runs, names, message, capsys) -> None:
    from ensemble.compare import main

    try:  # in-process: main() is what the command runs
        code = main([*names, "--runs-dir", str(runs), "--out-dir", str(runs.parent / "subs")])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def _scored(fold_miou: list[float]) -> Scored:
    return Scored("x", "experiment", "sha", np.array(fold_miou), {}, val_share=0.25)


def test_paired_tests_match_scipy_and_the_corrected_test_is_wider() -> None:
    a, b = _scored([0.50, 0.52, 0.48, 0.51, 0.49]), _scored([0.53, 0.54, 0.49, 0.55, 0.50])
    pair = paired_tests(a, b)
    assert pair.p_t == pytest.approx(stats.ttest_rel(b.fold_miou, a.fold_miou).pvalue)
    assert pair.p_wilcoxon == pytest.approx(stats.wilcoxon(b.fold_miou - a.fold_miou).pvalue)
    d = b.fold_miou - a.fold_miou
    t = d.mean() / math.sqrt((1 / 5 + 0.25) * d.var(ddof=1))
    assert pair.p_corrected == pytest.approx(2 * stats.t.sf(t, 4)) and pair.p_corrected > pair.p_t
    assert paired_tests(a, a).p_corrected == 1.0
    assert smallest_wilcoxon_p(5) == 0.0625


def test_holm_adjusts_the_corrected_p_values() -> None:
    pairs = [Paired(np.zeros(5), 0, 0, p) for p in (0.04, 0.01, 0.03)]
    holm(pairs)
    assert [p.p_holm for p in pairs] == pytest.approx([0.06, 0.03, 0.06])
