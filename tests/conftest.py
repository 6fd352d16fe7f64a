"""Shared fixtures: no network, small CPU thread pools, one tiny synthetic dataset and one set of trained smoke
folds per test session (shared by the pytest-xdist workers: the first to need one builds it, the others wait).

The end-to-end modules run first, so that the workers share the long files early and finish together.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SMOKE_EXPERIMENTS = ("exp093_2", "exp093_5")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whole modules marked e2e first (each worker sorts the same collection the same way, as xdist requires).
    def module_is_e2e(item: pytest.Item) -> bool:
        marks = getattr(item.module, "pytestmark", [])
        return any(m.name == "e2e" for m in (marks if isinstance(marks, list) else [marks]))

    items.sort(key=lambda item: not module_is_e2e(item))


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once per session by ``build`` (into an empty folder); under xdist, once for all workers."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    base = tmp_path_factory.getbasetemp().parent  # this session's folder, above every worker's own
    out, done = base / name, base / f"{name}.built"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # what a failed build left
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-train / 8-test synthetic root at 48x64 with its 5 folds (shared; do not modify it)."""
    from kfold.data.layout import open_root
    from kfold.data.synthetic import generate
    from kfold.splits import ensure_folds

    def build(out: Path) -> None:
        generate(out, n_train=40, n_test=8, size=(48, 64), seed=0)
        ensure_folds(open_root(out), k=5, seed=42)

    return shared_folder(tmp_path_factory, "synthetic", build)


@pytest.fixture(scope="session")
def smoke_runs(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/`` with exp093_2 and exp093_5 smoke-trained on all 5 folds of ``synthetic_root`` by their scripts
    (the two side by side, each fold in its script's process). Shared: copy it before changing anything in it."""

    def build(out: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, f"experiments/{exp}.py", "--preset", "smoke", "--data-root",
                                   str(synthetic_root), "--out", str(out)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for exp in SMOKE_EXPERIMENTS]
        logs = [proc.communicate(timeout=900)[0] for proc in procs]
        for proc, log in zip(procs, logs):
            assert proc.returncode == 0, log[-3000:]

    return shared_folder(tmp_path_factory, "smoke_runs", build)
