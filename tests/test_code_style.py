"""The code checks run as part of the test command, so CI enforces them.

ruff (lint), ruff's formatter and strict mypy are configured in pyproject.toml;
each must pass over the package, the tests, the benchmarks and the fuzz harness.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = ["lora_prune", "tests", "benchmarks", "fuzz"]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", *TREES],
        ["ruff", "format", "--check", *TREES],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_code_checks_pass(command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
