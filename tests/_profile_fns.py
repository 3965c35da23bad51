"""Shared check of the profile tests: a broken profile file is refused with a message naming it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cost_models import ProfileError, load_profile


def assert_rejected(tmp_path: Path, text: str, old: str, new: str, message: str) -> None:
    """``text`` with its first ``old`` replaced by ``new``, loaded from a file, raises a
    ``ProfileError`` that starts with the file's path and then matches ``message``."""
    assert old in text, old  # guards the test itself
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ProfileError, match=re.escape(str(path)) + ": .*" + message):
        load_profile(path)


def cpu_link_toml(name: str) -> str:
    """A small valid CPU profile up to its ``[links.intra_node]`` numbers: tests append the tables they check."""
    return f"""\
version = 2
name = "{name}"
device_type = "cpu"
source = "test"

[compute]
peak_flops_per_s = {{ float32 = 1e11 }}
compute_efficiency = 1.0
kernel_launch_seconds = 1e-5

[memory]
bytes_per_s = 2e10
capacity_nbytes = 8589934592
efficiency = 1.0

[links.intra_node]
latency_seconds = 5e-5
bytes_per_s = 1.5e9
call_overhead_seconds = 1e-4
"""
