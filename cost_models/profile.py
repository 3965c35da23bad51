"""Hardware profiles: the handful of numbers the cost model needs about one machine.

A profile says how fast one device computes and streams memory, and how fast one link hop
between two devices of the same node moves bytes:

    compute     peak_flops_per_s[dtype] * compute_efficiency     (FLOP/s actually reached)
                + kernel_launch_seconds per kernel               (the floor under every op)
    memory      memory_bytes_per_s * memory_efficiency           (B/s actually reached)
    link hop    T(m) = alpha + m / beta                          (alpha = latency_seconds,
                                                                  beta  = bytes_per_s)

Profiles live in TOML files (``cost_models/profiles/<name>.toml`` ships the built-in ones).
Every field name carries its unit, so a file cannot be read two ways. Schema version 1::

    version = 1
    name = "h100-sxm"
    device_type = "cuda"                                  # "cuda" or "cpu"
    source = "where the numbers come from"
    [compute]
    peak_flops_per_s = { float32 = 6.7e13, bfloat16 = 9.89e14 }   # must contain float32
    compute_efficiency = 0.7                              # in (0, 1]
    kernel_launch_seconds = 5e-6                          # >= 0
    [memory]
    bytes_per_s = 3.35e12
    capacity_nbytes = 85899345920
    efficiency = 0.8                                      # in (0, 1]
    [links.intra_node]
    latency_seconds = 3e-6                                # >= 0
    bytes_per_s = 4.5e11

Rates and capacities must be positive; times may be zero (an idealised link or launch), never
negative; nothing may be NaN or infinite. Unknown fields are errors, so a typo or a unit-less
name (``bandwidth = ...``) is caught rather than silently ignored.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "SCHEMA_VERSION",
    "HardwareProfile",
    "LinkProfile",
    "ProfileError",
    "available_profiles",
    "load_profile",
    "profile_from_dict",
]

SCHEMA_VERSION = 1
_DEVICE_TYPES = ("cuda", "cpu")
_FALLBACK_DTYPE = "float32"


class ProfileError(ValueError):
    """A hardware profile is missing, malformed, or holds an impossible number."""


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


class _FrozenFloatMap(Mapping[str, float]):
    """An immutable, hashable, picklable ``{str: float}``.

    ``types.MappingProxyType`` is read-only but neither hashable nor picklable, and a frozen
    dataclass should be both (profiles are dict keys in caches and travel to worker ranks).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, float]) -> None:
        self._items = {str(k): float(v) for k, v in sorted(items.items())}

    def __getitem__(self, key: str) -> float:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FrozenFloatMap, (dict(self._items),))


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """One link hop in the alpha-beta model: sending m bytes costs ``alpha + m / beta`` seconds.

    ``latency_seconds`` is alpha (per-message start-up: software, synchronisation, wire);
    ``bytes_per_s`` is beta, the bandwidth one device can push into the fabric in one direction
    (NCCL's "bus bandwidth"), not the bidirectional total a datasheet often quotes.
    ``call_overhead_seconds`` is paid once per collective call, whatever the group size: kernel
    launch, setup and completion (LogP's ``o``). It is what makes one all-reduce cheaper than a
    reduce-scatter plus an all-gather that move the same bytes over the same hops.
    """

    latency_seconds: float
    bytes_per_s: float
    call_overhead_seconds: float = 0.0

    def __post_init__(self) -> None:
        _validate_fields(self, _LINK_FIELD_CHECKS, owner="LinkProfile")


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """What the cost model knows about one device and its intra-node link.

    ``peak_flops_per_s`` maps dtype names as PyTorch spells them without the ``torch.`` prefix
    (``"float32"``, ``"bfloat16"``, ...) to datasheet peak FLOP/s. It must contain ``"float32"``,
    the fallback for any dtype it does not list. Achieved rates are peak times the efficiencies.
    """

    name: str
    device_type: str
    peak_flops_per_s: Mapping[str, float]
    memory_bytes_per_s: float
    memory_capacity_nbytes: int
    compute_efficiency: float
    memory_efficiency: float
    kernel_launch_seconds: float
    intra_node: LinkProfile
    source: str

    def __post_init__(self) -> None:
        table = _check_flops_table(
            self.peak_flops_per_s, where="HardwareProfile", name="peak_flops_per_s"
        )
        object.__setattr__(self, "peak_flops_per_s", table)
        _validate_fields(self, _HARDWARE_FIELD_CHECKS, owner="HardwareProfile")
        if not isinstance(self.intra_node, LinkProfile):
            raise _bad_field("HardwareProfile", "intra_node", "a LinkProfile", self.intra_node)

    def flops_per_s(self, dtype: str) -> float:
        """Datasheet peak FLOP/s for ``dtype`` (``"bfloat16"`` or ``"torch.bfloat16"``).

        A dtype the profile does not list falls back to the ``float32`` entry: for integer and
        bool ops (index arithmetic, masks) that is the general-purpose ALU rate, close enough
        for ops that are memory-bound anyway.
        """
        key = dtype.removeprefix("torch.")
        table = self.peak_flops_per_s
        return table[key] if key in table else table[_FALLBACK_DTYPE]


# --------------------------------------------------------------------------------------------
# Checks shared by the dataclasses (named by attribute) and the loader (named by TOML path)
# --------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """Raised by a checker with the text of what was expected; the caller adds where and what."""


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _bad_field(where: str, name: str, expected: str, value: object) -> ProfileError:
    """The one message shape: ``<where>: field '<name>' must be <expected>, got <type> <value>``."""
    return ProfileError(f"{where}: field {name!r} must be {expected}, got {_describe(value)}")


def _number(value: object) -> float:
    # bool is an int subclass in Python; `true` in a profile is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid("a number")
    if not math.isfinite(value):
        raise _Invalid("a finite number")
    return float(value)


def _positive(value: object) -> float:
    number = _number(value)
    if number <= 0:
        raise _Invalid("a positive number")
    return number


def _non_negative(value: object) -> float:
    number = _number(value)
    if number < 0:
        raise _Invalid("a number >= 0")
    return number


def _fraction(value: object) -> float:
    number = _number(value)
    if not 0 < number <= 1:
        raise _Invalid("a fraction in (0, 1]")
    return number


def _positive_int(value: object) -> int:
    number = _positive(value)
    if not number.is_integer():
        raise _Invalid("a positive whole number")
    return value if isinstance(value, int) else int(number)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("a non-empty string")
    return value


def _device_type(value: object) -> str:
    if value not in _DEVICE_TYPES:
        raise _Invalid(" or ".join(repr(d) for d in _DEVICE_TYPES))
    return str(value)


def _check_flops_table(value: object, *, where: str, name: str) -> _FrozenFloatMap:
    """Validate a ``{dtype: FLOP/s}`` table called ``name``; ``where`` starts messages."""
    if not isinstance(value, Mapping):
        raise _bad_field(where, name, "a table of dtype -> peak FLOP/s", value)
    checked: dict[str, float] = {}
    for dtype, rate in value.items():
        try:
            checked[str(dtype)] = _positive(rate)
        except _Invalid as exc:
            raise _bad_field(where, f"{name}.{dtype}", f"{exc} (peak FLOP/s)", rate) from None
    if _FALLBACK_DTYPE not in checked:
        raise _bad_field(
            where,
            name,
            f"a table with a {_FALLBACK_DTYPE!r} entry (the fallback for unlisted dtypes)",
            dict(value),
        )
    return _FrozenFloatMap(checked)


_LINK_FIELD_CHECKS: dict[str, Callable[[object], object]] = {
    "latency_seconds": _non_negative,
    "bytes_per_s": _positive,
    "call_overhead_seconds": _non_negative,
}
_HARDWARE_FIELD_CHECKS: dict[str, Callable[[object], object]] = {
    "name": _text,
    "device_type": _device_type,
    "memory_bytes_per_s": _positive,
    "memory_capacity_nbytes": _positive_int,
    "compute_efficiency": _fraction,
    "memory_efficiency": _fraction,
    "kernel_launch_seconds": _non_negative,
    "source": _text,
}


def _validate_fields(
    obj: object, checks: Mapping[str, Callable[[object], object]], *, owner: str
) -> None:
    """Check and normalise (e.g. int -> float) each attribute of a frozen dataclass."""
    for attr, check in checks.items():
        value = getattr(obj, attr)
        try:
            object.__setattr__(obj, attr, check(value))
        except _Invalid as exc:
            raise _bad_field(owner, attr, str(exc), value) from None


# --------------------------------------------------------------------------------------------
# TOML schema, version 1
# --------------------------------------------------------------------------------------------

# TOML path -> (checker, what the field means). The flops table and the link table are
# handled separately because they are tables, not scalars.
_SCALAR_FIELDS: dict[tuple[str, ...], tuple[Callable[[object], object], str]] = {
    ("name",): (_text, "profile name"),
    ("device_type",): (_device_type, "the torch device type the profile describes"),
    ("source",): (_text, "where the numbers come from: datasheet, paper or measurement"),
    ("compute", "compute_efficiency"): (_fraction, "achievable fraction of peak FLOP/s"),
    ("compute", "kernel_launch_seconds"): (_non_negative, "fixed cost of one kernel, seconds"),
    ("memory", "bytes_per_s"): (_positive, "peak memory bandwidth, bytes per second"),
    ("memory", "capacity_nbytes"): (_positive_int, "device memory size, bytes"),
    ("memory", "efficiency"): (_fraction, "achievable fraction of peak memory bandwidth"),
    ("links", "intra_node", "latency_seconds"): (_non_negative, "per-hop latency alpha, seconds"),
    ("links", "intra_node", "bytes_per_s"): (_positive, "per-hop bandwidth 1/beta, bytes/s"),
    ("links", "intra_node", "call_overhead_seconds"): (_non_negative, "fixed cost of one collective call, seconds"),
}
_FLOPS_PATH = ("compute", "peak_flops_per_s")

# Which keys each table may hold; anything else is a typo or a field without a unit.
_KNOWN_KEYS: dict[tuple[str, ...], frozenset[str]] = {
    (): frozenset({"version", "name", "device_type", "source", "compute", "memory", "links"}),
    ("compute",): frozenset({"peak_flops_per_s", "compute_efficiency", "kernel_launch_seconds"}),
    ("memory",): frozenset({"bytes_per_s", "capacity_nbytes", "efficiency"}),
    ("links",): frozenset({"intra_node"}),
    ("links", "intra_node"): frozenset({"latency_seconds", "bytes_per_s", "call_overhead_seconds"}),
}


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _lookup(data: Mapping[str, Any], path: tuple[str, ...], *, where: str, meaning: str) -> Any:
    node: Any = data
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping):
            raise _bad_field(where, _dotted(path[:depth]), "a table", node)
        if key not in node:
            raise ProfileError(f"{where}: missing required field {_dotted(path)!r} ({meaning})")
        node = node[key]
    return node


def _reject_unknown_keys(data: Mapping[str, Any], *, where: str) -> None:
    for path, known in _KNOWN_KEYS.items():
        table: Any = data
        for key in path:
            table = table.get(key) if isinstance(table, Mapping) else None
        if not isinstance(table, Mapping):
            continue  # missing or mistyped tables are reported by _lookup
        unknown = sorted(set(table) - known)
        if unknown:
            name = _dotted((*path, unknown[0]))
            raise ProfileError(
                f"{where}: unknown field {name!r}; expected one of {sorted(known)} "
                f"(units are part of each field name, e.g. bytes_per_s, latency_seconds)"
            )


def _check_version(data: Mapping[str, Any], *, where: str) -> None:
    meaning = f"schema version; this autotp reads version = {SCHEMA_VERSION}"
    version = _lookup(data, ("version",), where=where, meaning=meaning)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        expected = f"{SCHEMA_VERSION} (the only profile schema this autotp understands)"
        raise _bad_field(where, "version", expected, version)


def profile_from_dict(data: Mapping[str, Any], *, where: str = "<profile>") -> HardwareProfile:
    """Validate a parsed schema-1 profile and build the :class:`HardwareProfile`.

    ``where`` (usually the file path) starts every error message.
    """
    _check_version(data, where=where)
    _reject_unknown_keys(data, where=where)
    values: dict[tuple[str, ...], Any] = {}
    for path, (check, meaning) in _SCALAR_FIELDS.items():
        raw = _lookup(data, path, where=where, meaning=meaning)
        try:
            values[path] = check(raw)
        except _Invalid as exc:
            raise _bad_field(where, _dotted(path), f"{exc} ({meaning})", raw) from None
    flops_raw = _lookup(data, _FLOPS_PATH, where=where, meaning="table of dtype -> peak FLOP/s")
    flops = _check_flops_table(flops_raw, where=where, name=_dotted(_FLOPS_PATH))
    return HardwareProfile(
        name=values[("name",)],
        device_type=values[("device_type",)],
        peak_flops_per_s=flops,
        memory_bytes_per_s=values[("memory", "bytes_per_s")],
        memory_capacity_nbytes=values[("memory", "capacity_nbytes")],
        compute_efficiency=values[("compute", "compute_efficiency")],
        memory_efficiency=values[("memory", "efficiency")],
        kernel_launch_seconds=values[("compute", "kernel_launch_seconds")],
        intra_node=LinkProfile(
            latency_seconds=values[("links", "intra_node", "latency_seconds")],
            bytes_per_s=values[("links", "intra_node", "bytes_per_s")],
            call_overhead_seconds=values[("links", "intra_node", "call_overhead_seconds")],
        ),
        source=values[("source",)],
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _builtin_dir() -> Traversable:
    return importlib.resources.files("cost_models").joinpath("profiles")


def available_profiles() -> list[str]:
    """Names of the built-in profiles, sorted (``cost_models/profiles/<name>.toml``)."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in _builtin_dir().iterdir()
        if entry.is_file() and entry.name.endswith(".toml")
    )


def _looks_like_path(name_or_path: str | os.PathLike[str]) -> bool:
    if isinstance(name_or_path, os.PathLike):
        return True
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return name_or_path.endswith(".toml") or any(s in name_or_path for s in separators)


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """Load a hardware profile by built-in name (``"h100-sxm"``) or from a TOML file path.

    A ``PathLike``, or a string containing a path separator or ending in ``.toml``, is read as
    a file; any other string names a built-in profile (see :func:`available_profiles`).
    Raises :class:`ProfileError` naming the file and field for any problem.
    """
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProfileError(f"{where}: no such profile file") from None
        except OSError as exc:
            raise ProfileError(f"{where}: cannot read profile file: {exc}") from None
    else:
        name = str(name_or_path)
        available = available_profiles()
        if name not in available:
            raise ProfileError(
                f"unknown hardware profile {name!r}; available profiles: "
                f"{', '.join(available)} (or pass the path of a .toml profile file)"
            )
        resource = _builtin_dir().joinpath(f"{name}.toml")
        where = f"cost_models/profiles/{name}.toml"
        text = resource.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where}: not valid TOML: {exc}") from None
    return profile_from_dict(data, where=where)
