"""Byte sizes and durations: parsing what users type and formatting what we print."""
from __future__ import annotations

import re

from autotp.errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_nbytes(value: int | str | None) -> int | None:
    """``40GiB`` -> 42949672960; ints pass through; ``None`` means no limit."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"memory budget must be bytes (int) or a string like '40GiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"memory budget must be positive, got {value}")
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).upper() in _UNITS:
            nbytes = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
            if nbytes > 0:
                return nbytes
    raise ConfigError(
        f"cannot read memory budget {value!r}: expected a positive number of bytes or a string "
        "such as '40GiB', '512MiB' or '80GB'"
    )


def fmt_nbytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"
