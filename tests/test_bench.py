"""bench/run_all.py --tiny: every bench script still runs and its correctness checks hold (no timing asserts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs commands end to end in subprocesses (the e2e tier)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_output() -> str:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "bench/run_all.py", "--tiny"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"run_all --tiny failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def lines(out: str, group: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"{group} ")]


def test_every_script_ran(tiny_output: str) -> None:
    assert "all passed" in tiny_output
    for name in ("blend", "blend_size", "argmax", "tta", "metrics", "train_loop", "oof_store", "data", "scaling",
                 "predict", "trackers"):
        assert re.search(rf"^## bench_{name}\.py: [\d.]+ s, rc 0", tiny_output, re.M), name
    assert tiny_output.startswith("# machine: ")
    expected = {"blend": 10, "argmax": 2, "tta": 3, "metrics": 2, "train": 3, "oof": 5, "data": 4, "scaling": 1,
                "predict": 1, "trackers": 3}
    for group, n in expected.items():
        found = lines(tiny_output, group)
        assert len(found) >= n, (group, found)
        for line in found:
            if group != "scaling" or "ours" in line:
                assert " ours " in line, line


def test_correctness_checks(tiny_output: str) -> None:
    # The figures mean nothing at tiny sizes; these checks do.
    assert all("identical=True" in line for line in lines(tiny_output, "metrics"))
    assert "same_miou=True" in tiny_output
    class_argmax, fused = lines(tiny_output, "argmax")
    assert "identical=True" in class_argmax  # the kernel is torch's argmax, ties included
    assert float(re.search(r"same_pixels=([\d.]+)%", fused).group(1)) >= 99.9  # up to float near-ties
    flip = [line for line in lines(tiny_output, "tta") if line.split()[1] == "flip,"]
    assert flip
    for line in flip:  # flips only: ours and ttach average the same probabilities
        assert float(re.search(r"max_abs_diff=(\S+)", line).group(1)) < 1e-4, line
    for line in lines(tiny_output, "blend"):
        if "OOF mIoU others" in line:
            values = [float(v) for v in re.findall(r"\d\.\d{4}", line)]
            assert all(0.0 <= v <= 1.0 for v in values), line
    (predict,) = lines(tiny_output, "predict")  # tiny: scale 1 on a stride multiple, so the same numbers
    assert float(re.search(r"max_abs_diff=(\S+)", predict).group(1)) < 1e-3, predict
    (size,) = [line for line in lines(tiny_output, "blend") if " size " in line]  # the NYUv2-sized case, tiny
    assert "read stores once" in size and re.search(r"heap_peak_gib=\d", size) and "mapped_peak_gib=" in size
    streamed = [line for line in lines(tiny_output, "data") if "streamed" in line]
    assert len(streamed) == 2 and all("map-style" in line for line in streamed)
    ratio = [line for line in lines(tiny_output, "oof") if "bytes/image" in line][0]
    assert 7.5 < float(re.search(r"ratio ([\d.]+)x", ratio).group(1)) <= 8.0  # float16 at half scale: 1/8

