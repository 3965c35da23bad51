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
