"""Profile files: the TOML schema, loading by name or path, and writing.

Every field name carries its unit, so a file cannot be read two ways. Schema version 2
(``docs/calibration.md`` explains each field and how to measure it)::

    version = 2
    name = "h100-sxm"
    device_type = "cuda"                                  # "cuda" or "cpu"
    source = "where the numbers come from, in one line"

    [compute]
    peak_flops_per_s = { float32 = 6.7e13, bfloat16 = 9.895e14 }  # must contain float32
    compute_efficiency = 0.7                              # in (0, 1]
    kernel_launch_seconds = 5e-6                          # >= 0
    matmul_launch_seconds = 3e-6                          # optional, measured: a matmul's fixed cost
    matmul_weight_bytes_per_s = 8e9                       # optional, measured: a matmul fetches its
                                                          # weight at this rate on top of its compute
    overlap_slowdown = 0.15                               # optional, >= 0 (default 0): compute runs at
                                                          # 1/(1+this) beside a collective
    [compute.op_classes.activation]                       # optional, measured: a floor under
    launch_seconds = 4e-6                                 # each op of the class (view,
    seconds_per_flop = 8e-10                              # elementwise, activation,
                                                          # normalization, attention)

    [memory]
    bytes_per_s = 3.35e12
    capacity_nbytes = 85899345920
    efficiency = 0.8                                      # in (0, 1]

    [links]
    devices_per_node = 8                                  # optional; comes with inter_node

    [links.intra_node]                                    # required
    latency_seconds = 3e-6                                # alpha, per ring step
    bytes_per_s = 4.5e11                                  # beta, one direction
    call_overhead_seconds = 1e-5                          # o, once per call
    bandwidth_knees = [{ moved_nbytes = 33554432, bytes_per_s = 2e11 }]  # optional: past 32 MiB
                                                          # moved per rank, bytes move at 2e11
    algorithms = { all_reduce = "ring" }                  # optional: ring, tree or auto
    [links.intra_node.broadcast]                          # optional per-collective overrides
    bytes_per_s = 4e11                                    # (any of the three numbers; knees
                                                          # only with bytes_per_s, and replace
                                                          # the link's knees)

    [links.intra_node.wake]                               # optional, measured: what a collective
    gaps_seconds = [1.1e-3, 2.2e-3, 4.4e-3, 8.8e-3]       # pays beyond its price when it follows
    extra_seconds = [0.0, 4e-4, 1.3e-3, 1.3e-3]           # more compute than calibration ran
                                                          # before it (the first gap); also per
                                                          # collective: [links.intra_node.all_gather.wake]

    [links.intra_node.measured_groups.4]                  # optional: the link as measured on
    latency_seconds = 0.0                                 # groups of exactly 4 ranks (a whole
    bytes_per_s = 2.1e11                                  # link table: numbers, knees, algorithms,
    call_overhead_seconds = 4e-5                          # per-collective tables); it prices
                                                          # every group of 4

    [links.inter_node]                                    # optional, same fields as intra_node
    ...

    [sources]                                             # optional: field path -> provenance
    "memory.bytes_per_s" = "datasheet: H100 SXM5, 3.35 TB/s HBM3"

Version 1 files (no ``devices_per_node``, ``inter_node``, ``algorithms``,
``bandwidth_knees``, per-collective tables or ``sources``) still load. Loading checks types and signs, rejects unknown fields
(``bandwidth = ...`` has no unit), and checks that every number lies in a plausible range for
its unit, because a number far outside it (``bytes_per_s = 450``) is almost always written in
another unit (GB/s). Every error names the file and the field.

Names are looked up among the built-in profiles (``cost_models/profiles/<name>.toml``) and
then in the user profile directories: ``$AUTOTP_PROFILE_DIR`` (one or more directories,
separated like ``PATH``) or else ``$XDG_CONFIG_HOME/autotp/profiles`` (default
``~/.config/autotp/profiles``). ``autotp calibrate`` writes there. A user profile cannot
shadow a built-in name.
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cost_models.algorithms import ALGORITHMS, Collective
from cost_models.profile import (
    OP_CLASSES,
    BandwidthKnee,
    CollectiveLink,
    HardwareProfile,
    LinkProfile,
    OpClassRate,
    ProfileError,
    WakeCurve,
    _bad_field,
    _device_type,
    _fraction,
    _Invalid,
    _non_negative,
    _positive,
    _positive_int,
    _text,
    check_flops_table,
    increasing_knees,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "SCHEMA_VERSION",
    "available_profiles",
    "load_profile",
    "profile_from_dict",
    "profile_to_toml",
    "resolve_profile_path",
    "user_profile_dirs",
    "user_profiles",
    "write_profile",
]

SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
PROFILE_DIR_ENV = "AUTOTP_PROFILE_DIR"


# --------------------------------------------------------------------------------------------
# Plausible ranges: a number outside them is nearly always in the wrong unit
# --------------------------------------------------------------------------------------------

# unit -> (smallest, largest, what the unit is, a worked conversion)
_RANGES: dict[str, tuple[float, float, str, str]] = {
    "flops": (1e8, 1e17, "FLOP/s", "e.g. 989 TFLOP/s is 9.89e14"),
    "link_bandwidth": (1e6, 1e14, "bytes per second", "e.g. 450 GB/s is 4.5e11, 25 Gbit/s is 3.125e9"),
    "memory_bandwidth": (1e8, 1e14, "bytes per second", "e.g. 3.35 TB/s is 3.35e12"),
    "seconds": (0.0, 0.1, "seconds", "e.g. 5 us is 5e-6"),
    "capacity": (2**20, 2**50, "bytes", "e.g. 80 GiB is 85899345920"),
    "message": (1, 2**50, "bytes", "e.g. 32 MiB is 33554432"),
    "devices": (1, 4096, "devices", "devices per node, e.g. 8"),
}


def _in_range(unit: str) -> Callable[[float], None]:
    lo, hi, name, example = _RANGES[unit]

    def check(value: float) -> None:
        if not lo <= value <= hi:
            raise _Invalid(
                f"between {lo:g} and {hi:g} {name} (a number this far out is usually in another "
                f"unit; this field is in {name}, {example})"
            )

    return check


def _checked(base: Callable[[object], Any], unit: str | None) -> Callable[[object], Any]:
    if unit is None:
        return base
    in_range = _in_range(unit)

    def check(value: object) -> Any:
        number = base(value)
        in_range(number)
        return number

    return check


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------

# TOML path -> (checker, what the field means). Tables (flops, links, sources) are handled apart.
_SCALAR_FIELDS: dict[tuple[str, ...], tuple[Callable[[object], Any], str]] = {
    ("name",): (_text, "profile name"),
    ("device_type",): (_device_type, "the torch device type the profile describes"),
    ("source",): (_text, "where the numbers come from: datasheet, paper or measurement"),
    ("compute", "compute_efficiency"): (_fraction, "achievable fraction of peak FLOP/s"),
    ("compute", "kernel_launch_seconds"): (_checked(_non_negative, "seconds"), "fixed cost of one kernel, seconds"),
    ("memory", "bytes_per_s"): (_checked(_positive, "memory_bandwidth"), "peak memory bandwidth, bytes per second"),
    ("memory", "capacity_nbytes"): (_checked(_positive_int, "capacity"), "device memory size, bytes"),
    ("memory", "efficiency"): (_fraction, "achievable fraction of peak memory bandwidth"),
}
_LINK_FIELDS: dict[str, tuple[Callable[[object], Any], str]] = {
    "latency_seconds": (_checked(_non_negative, "seconds"), "per-step latency alpha, seconds"),
    "bytes_per_s": (_checked(_positive, "link_bandwidth"), "bandwidth beta of one direction, bytes/s"),
    "call_overhead_seconds": (_checked(_non_negative, "seconds"), "fixed cost of one collective call, seconds"),
}
_KNEES = "bandwidth_knees"
_KNEE_FIELDS: dict[str, tuple[Callable[[object], Any], str]] = {
    "moved_nbytes": (_checked(_positive, "message"), "bytes moved per rank past which the knee's bandwidth applies"),
    "bytes_per_s": (_checked(_positive, "link_bandwidth"), "bandwidth past the knee, bytes/s"),
}
_OP_CLASS_FIELDS: dict[str, tuple[Callable[[object], Any], str]] = {
    "launch_seconds": (_checked(_non_negative, "seconds"), "fixed cost of one op of the class, seconds"),
    "seconds_per_flop": (_checked(_non_negative, "seconds"), "seconds per FLOP as the cost model counts them"),
}
# Optional fields of [compute] (a calibrated CPU profile has them; datasheet profiles do not;
# overlap_slowdown, when absent, is HardwareProfile's default 0).
_OPTIONAL_FIELDS: dict[tuple[str, ...], tuple[Callable[[object], Any], str]] = {
    ("compute", "matmul_launch_seconds"): (_checked(_non_negative, "seconds"), "fixed cost of one matmul, seconds"),
    ("compute", "matmul_weight_bytes_per_s"): (_checked(_positive, "memory_bandwidth"), "rate at which a matmul fetches its weight on top of its compute, bytes per second"),
    ("compute", "overlap_slowdown"): (_non_negative, "how much compute slows while a collective communicates beside it: it runs at rate 1/(1+this)"),
}
_OP_CLASSES_PATH = ("compute", "op_classes")
_FLOPS_PATH = ("compute", "peak_flops_per_s")
_LINK_NAMES = ("intra_node", "inter_node")
_COLLECTIVE_NAMES = frozenset(c.value for c in Collective)
_GROUPS = "measured_groups"  # [links.<link>.measured_groups.<n>]: the link as measured on n ranks
_WAKE = "wake"  # [links.<link>.wake]: a collective's extra cost after longer compute (WakeCurve)
_WAKE_FIELDS = {"gaps_seconds": "compute gaps before a collective, seconds, the first the one calibration used",
                "extra_seconds": "what a collective costs beyond its price after each gap, seconds, 0 first"}

# Which keys each table may hold; anything else is a typo or a field without a unit.
_KNOWN_KEYS: dict[tuple[str, ...], frozenset[str]] = {
    (): frozenset({"version", "name", "device_type", "source", "compute", "memory", "links", "sources"}),
    ("compute",): frozenset({"peak_flops_per_s", "compute_efficiency", "kernel_launch_seconds", "op_classes", *(p[-1] for p in _OPTIONAL_FIELDS)}),
    _OP_CLASSES_PATH: frozenset(OP_CLASSES),
    **{(*_OP_CLASSES_PATH, c): frozenset(_OP_CLASS_FIELDS) for c in OP_CLASSES},
    ("memory",): frozenset({"bytes_per_s", "capacity_nbytes", "efficiency"}),
    ("links",): frozenset({"intra_node", "inter_node", "devices_per_node"}),
    **{("links", link): frozenset({*_LINK_FIELDS, _KNEES, "algorithms", _GROUPS, _WAKE} | _COLLECTIVE_NAMES) for link in _LINK_NAMES},
    **{("links", link, _WAKE): frozenset(_WAKE_FIELDS) for link in _LINK_NAMES},
    **{("links", link, "algorithms"): _COLLECTIVE_NAMES for link in _LINK_NAMES},
    **{("links", link, c): frozenset({*_LINK_FIELDS, _KNEES, _WAKE}) for link in _LINK_NAMES for c in _COLLECTIVE_NAMES},
    **{("links", link, c, _WAKE): frozenset(_WAKE_FIELDS) for link in _LINK_NAMES for c in _COLLECTIVE_NAMES},
}
# Fields a version-1 file may not use.
_VERSION_2_ONLY = (("links", "inter_node"), ("links", "devices_per_node"), ("sources",), _OP_CLASSES_PATH)


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


def _get(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _reject_unknown_keys(data: Mapping[str, Any], *, where: str) -> None:
    for path, known in _KNOWN_KEYS.items():
        _reject_unknown(_get(data, path) if path else data, known, path, where=where)


def _reject_unknown(table: object, known: frozenset[str], path: tuple[str, ...], *, where: str) -> None:
    if not isinstance(table, Mapping):
        return  # missing or mistyped tables are reported by _lookup
    unknown = sorted(set(table) - known)
    if unknown:
        name = _dotted((*path, unknown[0]))
        hint = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.6)
        raise ProfileError(
            f"{where}: unknown field {name!r}; expected one of {sorted(known)} "
            f"(units are part of each field name, e.g. bytes_per_s, latency_seconds)"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        )


def _check_version(data: Mapping[str, Any], *, where: str) -> int:
    meaning = f"schema version; this autotp reads version = {SCHEMA_VERSION}"
    version = _lookup(data, ("version",), where=where, meaning=meaning)
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        expected = f"{SCHEMA_VERSION} (or 1, the older schema; no other profile schema exists)"
        raise _bad_field(where, "version", expected, version)
    if version == 1:
        for path in _VERSION_2_ONLY:
            if _get(data, path) is not None:
                raise ProfileError(f"{where}: field {_dotted(path)!r} needs version = 2 (this file says version = 1)")
        for link in _LINK_NAMES:
            table = _get(data, ("links", link))
            extra = sorted(set(table) - set(_LINK_FIELDS)) if isinstance(table, Mapping) else []
            if extra:
                raise ProfileError(f"{where}: field {_dotted(('links', link, extra[0]))!r} needs version = 2 (this file says version = 1)")
    return int(version)


def _scalar(data: Mapping[str, Any], path: tuple[str, ...], check: Callable[[object], Any], meaning: str, *, where: str) -> Any:
    raw = _lookup(data, path, where=where, meaning=meaning)
    try:
        return check(raw)
    except _Invalid as exc:
        raise _bad_field(where, _dotted(path), f"{exc} ({meaning})", raw) from None


def _knees_from_dict(table: Mapping[str, Any], path: tuple[str, ...], *, where: str) -> tuple[BandwidthKnee, ...]:
    """``bandwidth_knees = [{ moved_nbytes = ..., bytes_per_s = ... }, ...]`` of the table at ``path``."""
    name = _dotted((*path, _KNEES))
    raw = table.get(_KNEES, [])
    expected = "an array of { moved_nbytes = ..., bytes_per_s = ... } tables"
    if not isinstance(raw, list):
        raise _bad_field(where, name, expected, raw)
    knees = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise _bad_field(where, f"{name}[{i}]", "a table { moved_nbytes = ..., bytes_per_s = ... }", entry)
        unknown = sorted(set(entry) - set(_KNEE_FIELDS))
        if unknown:
            hint = difflib.get_close_matches(unknown[0], sorted(_KNEE_FIELDS), n=1, cutoff=0.6)
            raise ProfileError(
                f"{where}: unknown field '{name}[{i}].{unknown[0]}'; expected one of {sorted(_KNEE_FIELDS)}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        values = {}
        for field, (check, meaning) in _KNEE_FIELDS.items():
            if field not in entry:
                raise ProfileError(f"{where}: missing required field '{name}[{i}].{field}' ({meaning})")
            try:
                values[field] = check(entry[field])
            except _Invalid as exc:
                raise _bad_field(where, f"{name}[{i}].{field}", f"{exc} ({meaning})", entry[field]) from None
        knees.append(BandwidthKnee(**values))
    try:
        return increasing_knees(knees)
    except _Invalid as exc:
        raise _bad_field(where, name, str(exc), raw) from None


def _link_from_dict(data: Mapping[str, Any], base: tuple[str, ...], *, where: str) -> LinkProfile:
    """The link table at ``base`` (``links.intra_node``, or one of its measured groups)."""
    values = {
        name: _scalar(data, (*base, name), check, meaning, where=where)
        for name, (check, meaning) in _LINK_FIELDS.items()
    }
    table = _get(data, base)
    overrides: dict[str, CollectiveLink] = {}
    for kind in sorted(_COLLECTIVE_NAMES & set(table)):
        sub = table[kind]
        if not isinstance(sub, Mapping):
            raise _bad_field(where, _dotted((*base, kind)), f"a table of {sorted({*_LINK_FIELDS, _KNEES, _WAKE})}", sub)
        fields = {}
        for name, (check, meaning) in _LINK_FIELDS.items():
            if name in sub:
                fields[name] = _scalar(data, (*base, kind, name), check, f"{meaning}, {kind} only", where=where)
        knees = _knees_from_dict(sub, (*base, kind), where=where)
        if knees and "bytes_per_s" not in sub:
            raise ProfileError(
                f"{where}: field {_dotted((*base, kind, _KNEES))!r} needs {_dotted((*base, kind, 'bytes_per_s'))!r} "
                "too: an override's knees continue its own bandwidth (without it the link's bandwidth and knees apply)"
            )
        overrides[kind] = CollectiveLink(**fields, bandwidth_knees=knees, wake=_wake_from_dict(data, (*base, kind, _WAKE), where=where))
    algorithms = table.get("algorithms", {})
    if not isinstance(algorithms, Mapping):
        raise _bad_field(where, _dotted((*base, "algorithms")), "a table of collective -> algorithm", algorithms)
    for kind, algorithm in algorithms.items():
        offered = [a.value for a in ALGORITHMS[Collective(kind)]] + ["auto"]
        if algorithm not in offered:
            raise _bad_field(where, _dotted((*base, "algorithms", kind)), f"one of {offered}", algorithm)
    knees = _knees_from_dict(table, base, where=where)
    return LinkProfile(**values, collectives=overrides, algorithms=dict(algorithms), bandwidth_knees=knees,
                       measured_groups=_measured_groups(data, base, where=where), wake=_wake_from_dict(data, (*base, _WAKE), where=where))


def _wake_from_dict(data: Mapping[str, Any], path: tuple[str, ...], *, where: str) -> WakeCurve | None:
    """``[<link>.wake]``: two equally long arrays of seconds (``WakeCurve``), or None when absent."""
    table = _get(data, path)
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise _bad_field(where, _dotted(path), f"a table of {sorted(_WAKE_FIELDS)}", table)
    arrays = {}
    for name, meaning in _WAKE_FIELDS.items():
        raw = _lookup(data, (*path, name), where=where, meaning=meaning)
        if not isinstance(raw, list):
            raise _bad_field(where, _dotted((*path, name)), f"an array of seconds ({meaning})", raw)
        check = _checked(_non_negative, "seconds")
        for i, value in enumerate(raw):
            try:
                check(value)
            except _Invalid as exc:
                raise _bad_field(where, f"{_dotted((*path, name))}[{i}]", f"{exc} ({meaning})", value) from None
        arrays[name] = tuple(raw)
    try:
        return WakeCurve(arrays["gaps_seconds"], arrays["extra_seconds"])
    except ProfileError as exc:
        raise ProfileError(f"{where}: field {_dotted(path)!r}: {str(exc).removeprefix('WakeCurve: ')}") from None


def _measured_groups(data: Mapping[str, Any], base: tuple[str, ...], *, where: str) -> dict[int, LinkProfile]:
    """``[<base>.measured_groups.<n>]`` tables: whole links, each for groups of exactly n ranks."""
    path = (*base, _GROUPS)
    groups = _get(data, path)
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise _bad_field(where, _dotted(path), "a table of group size -> link table", groups)
    out = {}
    for key, table in groups.items():
        if not key.isdigit() or int(key) < 2:
            raise _bad_field(where, _dotted((*path, key)), "a group size: a whole number >= 2", key)
        if not isinstance(table, Mapping):
            raise _bad_field(where, _dotted((*path, key)), "a link table", table)
        group = (*path, key)
        for known_path, known in _KNOWN_KEYS.items():  # a group's tables hold what the link's do, but no groups
            if known_path[:len(base)] == base:
                inner = known_path[len(base):]
                _reject_unknown(_get(table, inner) if inner else table, known - {_GROUPS}, (*group, *inner), where=where)
        out[int(key)] = _link_from_dict(data, group, where=where)
    return out


def _op_classes_from_dict(data: Mapping[str, Any], *, where: str) -> dict[str, OpClassRate]:
    table = _get(data, _OP_CLASSES_PATH)
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise _bad_field(where, _dotted(_OP_CLASSES_PATH), f"a table of op class -> {sorted(_OP_CLASS_FIELDS)}", table)
    rates = {}
    for name in table:
        path = (*_OP_CLASSES_PATH, name)
        if not isinstance(table[name], Mapping):
            raise _bad_field(where, _dotted(path), f"a table of {sorted(_OP_CLASS_FIELDS)}", table[name])
        rates[name] = OpClassRate(**{
            field: _scalar(data, (*path, field), check, f"{meaning}, {name} ops", where=where)
            for field, (check, meaning) in _OP_CLASS_FIELDS.items()
        })
    return rates


def _known_source_paths(data: Mapping[str, Any]) -> set[str]:
    """Every dotted path a ``[sources]`` key may name: the profile's numbers and their tables."""
    paths = {_dotted(p) for p in (*_SCALAR_FIELDS, *_OPTIONAL_FIELDS)} | {_dotted(_FLOPS_PATH), "compute", "memory", "links", "links.devices_per_node"}
    flops = _get(data, _FLOPS_PATH)
    if isinstance(flops, Mapping):
        paths |= {_dotted((*_FLOPS_PATH, k)) for k in flops}
    classes = _get(data, _OP_CLASSES_PATH)
    if isinstance(classes, Mapping):
        paths |= {_dotted(_OP_CLASSES_PATH)}
        for name in classes:
            paths |= {_dotted((*_OP_CLASSES_PATH, name))} | {_dotted((*_OP_CLASSES_PATH, name, f)) for f in _OP_CLASS_FIELDS}
    for link in _LINK_NAMES:
        table = _get(data, ("links", link))
        paths |= _link_source_paths(table, f"links.{link}")
        groups = table.get(_GROUPS) if isinstance(table, Mapping) else None
        if isinstance(groups, Mapping):
            for n, group in groups.items():
                paths |= _link_source_paths(group, f"links.{link}.{_GROUPS}.{n}")
    return paths


def _link_source_paths(table: object, name: str) -> set[str]:
    if not isinstance(table, Mapping):
        return set()
    paths = {name} | {f"{name}.{f}" for f in _LINK_FIELDS}
    if _KNEES in table:
        paths.add(f"{name}.{_KNEES}")
    for kind in _COLLECTIVE_NAMES & set(table):
        paths |= {f"{name}.{kind}"} | {f"{name}.{kind}.{f}" for f in table[kind]}
        if isinstance(table[kind], Mapping) and _WAKE in table[kind]:
            paths |= {f"{name}.{kind}.{_WAKE}.{f}" for f in _WAKE_FIELDS}
    if "algorithms" in table:
        paths.add(f"{name}.algorithms")
    if _WAKE in table:
        paths |= {f"{name}.{_WAKE}"} | {f"{name}.{_WAKE}.{f}" for f in _WAKE_FIELDS}
    return paths


def _sources(data: Mapping[str, Any], *, where: str) -> dict[str, str]:
    raw = data.get("sources", {})
    if not isinstance(raw, Mapping):
        raise _bad_field(where, "sources", "a table of field path -> where its number comes from", raw)
    known = _known_source_paths(data)
    checked: dict[str, str] = {}
    for key, text in raw.items():
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            raise ProfileError(
                f"{where}: field 'sources' names {key!r}, which is not a field of this profile"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        try:
            checked[key] = _text(text)
        except _Invalid as exc:
            raise _bad_field(where, f"sources.{key}", str(exc), text) from None
    return checked


def profile_from_dict(data: Mapping[str, Any], *, where: str = "<profile>") -> HardwareProfile:
    """Validate a parsed profile (schema version 1 or 2) and build the :class:`HardwareProfile`.

    ``where`` (usually the file path) starts every error message.
    """
    _check_version(data, where=where)
    _reject_unknown_keys(data, where=where)
    values = {path: _scalar(data, path, check, meaning, where=where) for path, (check, meaning) in _SCALAR_FIELDS.items()}
    flops_raw = _lookup(data, _FLOPS_PATH, where=where, meaning="table of dtype -> peak FLOP/s")
    flops = check_flops_table(flops_raw, where=where, name=_dotted(_FLOPS_PATH))
    in_range = _in_range("flops")
    for dtype, rate in flops.items():
        try:
            in_range(rate)
        except _Invalid as exc:
            raise _bad_field(where, _dotted((*_FLOPS_PATH, dtype)), str(exc), rate) from None
    intra = _link_from_dict(data, ("links", "intra_node"), where=where)
    inter = _link_from_dict(data, ("links", "inter_node"), where=where) if _get(data, ("links", "inter_node")) is not None else None
    devices = _get(data, ("links", "devices_per_node"))
    if (inter is None) != (devices is None):
        given, missing = ("links.inter_node", "links.devices_per_node") if inter is not None else ("links.devices_per_node", "links.inter_node")
        raise ProfileError(
            f"{where}: field {given!r} needs {missing!r} too: a multi-node profile gives the "
            "inter-node link and how many devices one node holds; a one-node profile gives neither"
        )
    if devices is not None:
        devices = _scalar(data, ("links", "devices_per_node"), _checked(_positive_int, "devices"), "devices in one node", where=where)
    return HardwareProfile(
        name=values[("name",)],
        device_type=values[("device_type",)],
        peak_flops_per_s=flops,
        memory_bytes_per_s=values[("memory", "bytes_per_s")],
        memory_capacity_nbytes=values[("memory", "capacity_nbytes")],
        compute_efficiency=values[("compute", "compute_efficiency")],
        memory_efficiency=values[("memory", "efficiency")],
        kernel_launch_seconds=values[("compute", "kernel_launch_seconds")],
        intra_node=intra,
        source=values[("source",)],
        inter_node=inter,
        devices_per_node=devices,
        sources=_sources(data, where=where),
        op_classes=_op_classes_from_dict(data, where=where),
        **{path[-1]: _scalar(data, path, check, meaning, where=where) for path, (check, meaning) in _OPTIONAL_FIELDS.items() if _get(data, path) is not None},
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form; "1e-05" is valid TOML
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to a profile")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _comment(text: str | None) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()] if text else []


def _knees_line(knees: tuple[BandwidthKnee, ...]) -> str:
    """``bandwidth_knees = [...]``, a whole moved_nbytes written as an integer (33554432, not 33554432.0)."""
    tables = [
        {"moved_nbytes": int(k.moved_nbytes) if k.moved_nbytes.is_integer() else k.moved_nbytes, "bytes_per_s": k.bytes_per_s}
        for k in knees
    ]
    return f"{_KNEES} = {_toml_value(tables)}"


def _wake_lines(name: str, wake: WakeCurve, comments: Mapping[str, str]) -> list[str]:
    return ["", *_comment(comments.get(f"links.{name}.{_WAKE}")), f"[links.{name}.{_WAKE}]",
            f"gaps_seconds = {_toml_value(list(wake.gaps_seconds))}", f"extra_seconds = {_toml_value(list(wake.extra_seconds))}"]


def _link_lines(name: str, link: LinkProfile, comments: Mapping[str, str]) -> list[str]:
    lines = ["", *_comment(comments.get(f"links.{name}")), f"[links.{name}]"]
    for field in ("latency_seconds", "bytes_per_s", "call_overhead_seconds"):
        lines += [*_comment(comments.get(f"links.{name}.{field}")), f"{field} = {_toml_value(getattr(link, field))}"]
    if link.bandwidth_knees:
        lines += [*_comment(comments.get(f"links.{name}.{_KNEES}")), _knees_line(link.bandwidth_knees)]
    if link.algorithms:
        lines.append(f"algorithms = {_toml_value(dict(link.algorithms))}")
    for kind, override in link.collectives.items():
        lines += ["", *_comment(comments.get(f"links.{name}.{kind}")), f"[links.{name}.{kind}]"]
        for field in ("latency_seconds", "bytes_per_s", "call_overhead_seconds"):
            value = getattr(override, field)
            if value is not None:
                lines.append(f"{field} = {_toml_value(value)}")
        if override.bandwidth_knees:
            lines.append(_knees_line(override.bandwidth_knees))
        if override.wake is not None:
            lines += _wake_lines(f"{name}.{kind}", override.wake, comments)
    if link.wake is not None:
        lines += _wake_lines(name, link.wake, comments)
    for n, group in link.measured_groups.items():
        lines += _link_lines(f"{name}.{_GROUPS}.{n}", group, comments)
    return lines


def profile_to_toml(profile: HardwareProfile, *, header: str = "", comments: Mapping[str, str] | None = None) -> str:
    """``profile`` as a schema-2 TOML document that :func:`load_profile` reads back equal.

    ``header`` becomes a comment block at the top; ``comments`` maps a dotted field path to a
    comment written above that field (a report, a derivation).
    """
    notes = dict(comments or {})
    lines = [*_comment(header), f"version = {SCHEMA_VERSION}", f"name = {_toml_value(profile.name)}",
             f"device_type = {_toml_value(profile.device_type)}", f"source = {_toml_value(profile.source)}",
             "", "[compute]"]
    lines += [*_comment(notes.get("compute.peak_flops_per_s")), f"peak_flops_per_s = {_toml_value(dict(profile.peak_flops_per_s))}"]
    lines += [*_comment(notes.get("compute.compute_efficiency")), f"compute_efficiency = {_toml_value(profile.compute_efficiency)}"]
    lines += [*_comment(notes.get("compute.kernel_launch_seconds")), f"kernel_launch_seconds = {_toml_value(profile.kernel_launch_seconds)}"]
    for path in _OPTIONAL_FIELDS:
        if (value := getattr(profile, path[-1])) is not None:
            lines += [*_comment(notes.get(_dotted(path))), f"{path[-1]} = {_toml_value(value)}"]
    for name, rate in profile.op_classes.items():
        lines += ["", *_comment(notes.get(f"compute.op_classes.{name}")), f"[compute.op_classes.{name}]",
                  f"launch_seconds = {_toml_value(rate.launch_seconds)}", f"seconds_per_flop = {_toml_value(rate.seconds_per_flop)}"]
    lines += ["", "[memory]"]
    lines += [*_comment(notes.get("memory.bytes_per_s")), f"bytes_per_s = {_toml_value(profile.memory_bytes_per_s)}"]
    lines += [*_comment(notes.get("memory.capacity_nbytes")), f"capacity_nbytes = {_toml_value(profile.memory_capacity_nbytes)}"]
    lines += [*_comment(notes.get("memory.efficiency")), f"efficiency = {_toml_value(profile.memory_efficiency)}"]
    if profile.devices_per_node is not None:
        lines += ["", "[links]", f"devices_per_node = {profile.devices_per_node}"]
    lines += _link_lines("intra_node", profile.intra_node, notes)
    if profile.inter_node is not None:
        lines += _link_lines("inter_node", profile.inter_node, notes)
    if profile.sources:
        lines += ["", "[sources]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in profile.sources.items()]
    return "\n".join(lines) + "\n"


def write_profile(profile: HardwareProfile, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``profile`` to ``path`` (parents created) and check it loads back equal."""
    path = Path(path)
    text = profile_to_toml(profile, **kwargs)
    loaded = profile_from_dict(tomllib.loads(text), where=str(path))
    if loaded != profile:
        raise ProfileError(f"{path}: the written profile does not read back equal (a bug in profile_to_toml)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


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


def user_profile_dirs() -> list[Path]:
    """Where profiles are looked up by name after the built-in ones, in order.

    ``$AUTOTP_PROFILE_DIR`` (several directories separated by ``os.pathsep``) when set,
    else ``$XDG_CONFIG_HOME/autotp/profiles``, else ``~/.config/autotp/profiles``.
    """
    env = os.environ.get(PROFILE_DIR_ENV)
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return [Path(config) / "autotp" / "profiles"]


def user_profiles() -> list[str]:
    """Names of the profiles in the user profile directories, sorted."""
    names = {p.stem for d in user_profile_dirs() if d.is_dir() for p in d.glob("*.toml") if p.is_file()}
    return sorted(names - set(available_profiles()))


def _looks_like_path(name_or_path: str | os.PathLike[str]) -> bool:
    if isinstance(name_or_path, os.PathLike):
        return True
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return name_or_path.endswith(".toml") or any(s in name_or_path for s in separators)


def resolve_profile_path(name: str) -> Path | None:
    """The file of user profile ``name`` (first user directory that has it), or ``None``."""
    for directory in user_profile_dirs():
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not a text file; a hardware profile is TOML (see `autotp calibrate` to write one)") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile file: {exc}") from None


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """Load a hardware profile by name (``"h100-sxm"``) or from a TOML file path.

    A ``PathLike``, or a string containing a path separator or ending in ``.toml``, is read as
    a file. Any other string names a built-in profile (see :func:`available_profiles`) or,
    failing that, a profile in a user profile directory (see :func:`user_profile_dirs`).
    Raises :class:`ProfileError` naming the file and field for any problem.
    """
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        where, text = str(path), _read(path)
    else:
        name = str(name_or_path)
        if name in available_profiles():
            where = f"cost_models/profiles/{name}.toml"
            text = _builtin_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8")
        else:
            path = resolve_profile_path(name)  # type: ignore[assignment]  # None raises just below
            if path is None:
                dirs = ", ".join(str(d) for d in user_profile_dirs())
                user = user_profiles()
                raise ProfileError(
                    f"unknown hardware profile {name!r}; available profiles: "
                    f"{', '.join(available_profiles())}"
                    + (f"; user profiles: {', '.join(user)}" if user else "")
                    + f" (user profiles are looked up in {dirs}; or pass the path of a .toml "
                    "profile file; `autotp calibrate` writes one for this machine)"
                )
            where, text = str(path), _read(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where}: not valid TOML: {exc}") from None
    return profile_from_dict(data, where=where)
