"""The real console script, in a subprocess."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest


@pytest.mark.timeout(300)
def test_demo_runs_and_matches() -> None:
    exe = shutil.which("autotp")
    assert exe, "the autotp console script is not installed (pip install -e .)"
    done = subprocess.run([exe, "demo", "--nproc", "2", "--example", "mlp"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK: the sharded model matches the original" in done.stdout
    diff = float(re.search(r"max \|sharded - original\| over 2 ranks: ([0-9.e+-]+)", done.stdout).group(1))
    assert diff <= 1e-4


def test_help_lists_commands() -> None:
    done = subprocess.run([shutil.which("autotp") or "autotp", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "demo" in done.stdout
