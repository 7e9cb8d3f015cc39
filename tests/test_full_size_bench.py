"""benchmarks/full_size.py runs end to end at its smoke size and prints finite ratios."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_full_size_smoke_prints_finite_ratios() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "full_size.py"), "--smoke", "--naive", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ratios = dict(re.findall(r"ratio (.+?): ([0-9.]+)x", run.stdout))
    assert set(ratios) == {
        "one by one / floor",
        "batched / floor",
        "naive (extrapolated) / batched",
    }
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in ratios.values())
    assert "EXTRAPOLATED" in run.stdout and "SMOKE" in run.stdout
