"""Hardware profiles: the handful of numbers the cost model needs about one machine.

A profile says how fast one device computes and streams memory, and how fast the links between
devices move bytes:

    compute     peak_flops_per_s[dtype] * compute_efficiency     (FLOP/s actually reached)
                + kernel_launch_seconds per kernel               (the floor under every op)
    memory      memory_bytes_per_s * memory_efficiency           (B/s actually reached)
    link        T = o + steps · alpha + bytes_moved / beta       (o = call_overhead_seconds,
                    + Σ_i max(0, bytes_moved - k_i)               alpha = latency_seconds,
                          · (1/beta_i - 1/beta_{i-1})             beta = beta_0 = bytes_per_s,
                                                                  knee i: past k_i bytes moved,
                                                                  bytes move at beta_i)

There is one link for devices of the same node (``intra_node``: NVLink, PCIe, loopback) and,
optionally, one for devices on different nodes (``inter_node``: InfiniBand, Ethernet) with the
number of devices per node that separates them. A link may override ``o``, ``alpha`` or
``beta`` for one collective (a measured profile does, because e.g. gloo's broadcast streams
bytes several times faster than its all-gather) and may pick each collective's algorithm
(ring, tree, or ``auto``: the cheaper per call). Bandwidth knees make the time a continuous,
piecewise-linear function of the bytes moved: loopback slows once a message leaves the CPU
caches, a NIC or NCCL switches protocol at some size, and one straight line cannot follow both.

This module holds the validated, frozen values. :mod:`cost_models.profile_files` reads and
writes them as TOML (the schema is documented there and in ``docs/calibration.md``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cost_models.algorithms import ALGORITHMS, AUTO, Algorithm, Collective, parse_algorithm, parse_collective

__all__ = ["OP_CLASSES", "BandwidthKnee", "CollectiveLink", "HardwareProfile", "LinkProfile", "OpClassRate", "ProfileError", "WakeCurve"]

_DEVICE_TYPES = ("cuda", "cpu")
_FALLBACK_DTYPE = "float32"


class ProfileError(ValueError):
    """A hardware profile is missing, malformed, or holds an impossible number."""


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


class FrozenMap(Mapping[str, Any]):
    """An immutable, hashable, picklable ``{str: value}`` with sorted keys.

    ``types.MappingProxyType`` is read-only but neither hashable nor picklable, and a frozen
    dataclass should be both (profiles are dict keys in caches and travel to worker ranks).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items = {(k if isinstance(k, int) else str(k)): v for k, v in sorted((items or {}).items())}  # int keys: group sizes

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self._items),))


@dataclass(frozen=True, slots=True)
class BandwidthKnee:
    """Past ``moved_nbytes`` bytes moved per rank, each further byte moves at ``bytes_per_s``.

    Knees are in bytes *moved*, not message bytes, so one knee serves every group size (a
    64 MiB all-gather moves 32 MiB per rank on 2 ranks, 48 MiB on 4). E.g. beta = 1e9 B/s and
    a knee (1e6, 5e8): moving 3e6 bytes takes 3e6 / 1e9 + 2e6 · (1 / 5e8 - 1 / 1e9) = 5e-3 s.
    """

    moved_nbytes: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        _validate_fields(self, _KNEE_FIELD_CHECKS, owner="BandwidthKnee")


@dataclass(frozen=True, slots=True)
class WakeCurve:
    """What a collective costs beyond its fitted price when it follows a longer stretch of compute.

    ``gaps_seconds[0]`` is the compute gap the link's collectives were measured after (the
    reference); after a gap g a collective costs ``seconds(g)`` more: linear between the
    measured points, 0 up to the reference, the last extra beyond the last gap. On gloo over
    loopback the wake-up grows with the idle time and levels off: on the 2-core CI VM a
    128 KiB all-gather took 1.0 ms after 1.2 ms of compute and 2.4 ms after 3.6 ms, and about
    as much after 9 and 23 ms. Gaps strictly increase; extras start at 0 and never decrease.
    """

    gaps_seconds: tuple[float, ...]
    extra_seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        gaps, extras = self.gaps_seconds, self.extra_seconds
        for attr, values in (("gaps_seconds", gaps), ("extra_seconds", extras)):
            if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
                raise _bad_field("WakeCurve", attr, "a sequence of seconds", values)
            try:
                object.__setattr__(self, attr, tuple(_non_negative(v) for v in values))
            except _Invalid as exc:
                raise _bad_field("WakeCurve", attr, f"a sequence of seconds, each {exc}", values) from None
        gaps, extras = self.gaps_seconds, self.extra_seconds
        if len(gaps) < 2 or len(gaps) != len(extras):
            raise ProfileError(f"WakeCurve: fields 'gaps_seconds' and 'extra_seconds' need the same number of points, at least 2; got {len(gaps)} and {len(extras)}")
        if any(b <= a for a, b in itertools.pairwise(gaps)):
            raise _bad_field("WakeCurve", "gaps_seconds", "strictly increasing gaps", gaps)
        if extras[0] != 0.0 or any(b < a for a, b in itertools.pairwise(extras)):
            raise _bad_field("WakeCurve", "extra_seconds", "0 at the reference gap, then never decreasing", extras)

    def segments(self) -> tuple[tuple[float, float, float], ...]:
        """``(from, to, slope)`` of each linear piece between measured gaps."""
        points = list(zip(self.gaps_seconds, self.extra_seconds))
        return tuple((g0, g1, (e1 - e0) / (g1 - g0)) for (g0, e0), (g1, e1) in itertools.pairwise(points))

    def seconds(self, gap_seconds: float) -> float:
        """Extra seconds of a collective that follows ``gap_seconds`` of compute (0 up to the reference).

        E.g. gaps (1e-3, 3e-3, 9e-3) and extras (0, 1.2e-3, 1.5e-3): 0 after 0.5 ms, 0.6e-3 s
        after 2 ms, 1.5e-3 s after 20 ms.
        """
        return sum(slope * (min(max(gap_seconds, g0), g1) - g0) for g0, g1, slope in self.segments())


@dataclass(frozen=True, slots=True)
class CollectiveLink:
    """Per-collective replacements for a link's ``o``, ``alpha`` and ``beta``; ``None`` keeps the link's.

    ``bandwidth_knees`` continue this override's ``bytes_per_s`` and need it: an override that
    sets ``bytes_per_s`` replaces the link's knees with its own (none when it gives none).
    """

    call_overhead_seconds: float | None = None
    latency_seconds: float | None = None
    bytes_per_s: float | None = None
    bandwidth_knees: tuple[BandwidthKnee, ...] = ()
    wake: WakeCurve | None = None  # replaces the link's wake curve for this collective

    def __post_init__(self) -> None:
        _validate_fields(self, _OVERRIDE_FIELD_CHECKS, owner="CollectiveLink")
        if self.wake is not None and not isinstance(self.wake, WakeCurve):
            raise _bad_field("CollectiveLink", "wake", "a WakeCurve or None", self.wake)
        _validate_knees(self, owner="CollectiveLink")
        if self.bandwidth_knees and self.bytes_per_s is None:
            raise ProfileError(
                "CollectiveLink: field 'bandwidth_knees' needs 'bytes_per_s' too: knees continue "
                "the override's own bandwidth (without it the link's bandwidth and knees apply)"
            )


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """One kind of link in the alpha-beta model: sending m bytes costs ``alpha + m / beta`` seconds.

    ``latency_seconds`` is alpha (per-message start-up: software, synchronisation, wire);
    ``bytes_per_s`` is beta, the bandwidth one device can push into the fabric in one direction
    (NCCL's "bus bandwidth"), not the bidirectional total a datasheet often quotes.
    ``call_overhead_seconds`` is paid once per collective call, whatever the group size: kernel
    launch, setup and completion (LogP's ``o``). It is what makes one all-reduce cheaper than a
    reduce-scatter plus an all-gather that move the same bytes over the same hops.

    ``collectives`` maps a collective name to a :class:`CollectiveLink` replacing some of the
    three numbers for that collective only; ``algorithms`` maps a collective name to the
    algorithm it runs (``"ring"``, ``"tree"``, ``"pairwise"`` or ``"auto"``; default: the
    collective's first algorithm, see :mod:`cost_models.algorithms`). ``bandwidth_knees``
    (:class:`BandwidthKnee`, strictly increasing ``moved_nbytes``) bend beta where bandwidth
    changes with the message size; empty, the link is one straight line.

    ``measured_groups`` maps a group size n to the link as measured on groups of exactly n
    ranks: a whole link (its own numbers, overrides and algorithms) that prices every group
    of that size (:meth:`for_group`). Calibration writes one per group size it timed: on a
    CPU with fewer cores than the ranks' threads, or where copies dominate, time does not
    scale with n as any algorithm's textbook cost says (gloo's all_to_all of 64 MiB took
    21.6 ms on 2 ranks and 9.2 ms on 4 on a 16-core host, where the model's bytes moved
    say 4 ranks are the slower).

    ``wake`` (:class:`WakeCurve`, per collective through its override, :meth:`wake_curve`)
    prices what a collective pays beyond its fitted cost when it follows more compute than
    calibration ran before it; ``None`` (datasheet links: NCCL
    collectives queue on the GPU stream and pay no such wake-up) means nothing.
    """

    latency_seconds: float
    bytes_per_s: float
    call_overhead_seconds: float = 0.0
    collectives: Mapping[str, CollectiveLink] = field(default_factory=FrozenMap)
    algorithms: Mapping[str, str] = field(default_factory=FrozenMap)
    bandwidth_knees: tuple[BandwidthKnee, ...] = ()
    measured_groups: Mapping[int, LinkProfile] = field(default_factory=FrozenMap)  # type: ignore[arg-type]  # FrozenMap keeps int keys too
    wake: WakeCurve | None = None

    def __post_init__(self) -> None:
        _validate_fields(self, _LINK_FIELD_CHECKS, owner="LinkProfile")
        if self.wake is not None and not isinstance(self.wake, WakeCurve):
            raise _bad_field("LinkProfile", "wake", "a WakeCurve or None", self.wake)
        _validate_knees(self, owner="LinkProfile")
        groups = dict(self.measured_groups)
        for n, link in groups.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ProfileError(f"LinkProfile: field 'measured_groups' has group size {n!r}; expected an int >= 2")
            if not isinstance(link, LinkProfile):
                raise _bad_field("LinkProfile", f"measured_groups.{n}", "a LinkProfile", link)
            if link.measured_groups:
                raise ProfileError(f"LinkProfile: field 'measured_groups.{n}' has measured groups of its own; a measured group is one group size")
        object.__setattr__(self, "measured_groups", FrozenMap(groups))  # type: ignore[arg-type]  # int keys: group sizes
        overrides: dict[str, CollectiveLink] = {}
        for name, override in dict(self.collectives).items():
            kind = _collective_name(name, owner="LinkProfile", attr="collectives")
            if not isinstance(override, CollectiveLink):
                raise _bad_field("LinkProfile", f"collectives.{name}", "a CollectiveLink", override)
            overrides[kind.value] = override
        object.__setattr__(self, "collectives", FrozenMap(overrides))
        algorithms: dict[str, str] = {}
        for name, algorithm in dict(self.algorithms).items():
            kind = _collective_name(name, owner="LinkProfile", attr="algorithms")
            try:
                chosen = parse_algorithm(kind, algorithm)
            except ValueError as exc:
                raise ProfileError(f"LinkProfile: field 'algorithms.{name}': {exc}") from None
            algorithms[kind.value] = str(chosen)
        object.__setattr__(self, "algorithms", FrozenMap(algorithms))

    def for_group(self, group_size: int) -> LinkProfile:
        """The link as measured on groups of ``group_size`` ranks if it was, else this one."""
        return self.measured_groups.get(group_size, self)

    def alpha_beta(self, kind: Collective | str) -> tuple[float, float, float]:
        """``(o, alpha, beta)`` for ``kind``: the link's numbers with that collective's overrides."""
        override = self.collectives.get(parse_collective(kind).value)
        o, alpha, beta = self.call_overhead_seconds, self.latency_seconds, self.bytes_per_s
        if override is not None:
            o = o if override.call_overhead_seconds is None else override.call_overhead_seconds
            alpha = alpha if override.latency_seconds is None else override.latency_seconds
            beta = beta if override.bytes_per_s is None else override.bytes_per_s
        return o, alpha, beta

    def knees(self, kind: Collective | str) -> tuple[BandwidthKnee, ...]:
        """The knees after ``alpha_beta(kind)``'s beta: an override's own when it sets
        ``bytes_per_s`` (none if it gives none), else the link's."""
        override = self.collectives.get(parse_collective(kind).value)
        if override is not None and override.bytes_per_s is not None:
            return override.bandwidth_knees
        return self.bandwidth_knees

    def wake_curve(self, kind: Collective | str) -> WakeCurve | None:
        """``kind``'s wake curve: its override's when it has one, else the link's."""
        override = self.collectives.get(parse_collective(kind).value)
        return override.wake if override is not None and override.wake is not None else self.wake

    def algorithm(self, kind: Collective | str) -> Algorithm | str:
        """The algorithm ``kind`` runs on this link, or ``"auto"`` (cheapest per call)."""
        kind = parse_collective(kind)
        name = self.algorithms.get(kind.value)
        return ALGORITHMS[kind][0] if name is None else (AUTO if name == AUTO else Algorithm(name))


# Classes of non-matmul ops whose measured cost a profile may state (``HardwareProfile.op_classes``):
# views (dispatch only, no kernel), arithmetic elementwise ops, transcendental activations,
# normalisations and softmax (row reductions), and fused attention.
OP_CLASSES = ("view", "elementwise", "activation", "normalization", "attention")


@dataclass(frozen=True, slots=True)
class OpClassRate:
    """A measured floor under every op of one class: ``launch_seconds + flops · seconds_per_flop``.

    The roofline prices an op by its FLOPs and bytes at matmul and streaming rates; on a CPU a
    GELU or a LayerNorm runs several times slower than its bytes suggest, and every op, a view
    included, pays the framework's dispatch. FLOPs are the cost model's count: one per output
    element for elementwise, activation and normalization ops, ``4·B·H·Tq·Tk·D`` for attention,
    none for a view.
    """

    launch_seconds: float
    seconds_per_flop: float

    def __post_init__(self) -> None:
        _validate_fields(self, _OP_CLASS_FIELD_CHECKS, owner="OpClassRate")

    def seconds(self, flops: float) -> float:
        return self.launch_seconds + flops * self.seconds_per_flop


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """What the cost model knows about one device and the links between devices.

    ``peak_flops_per_s`` maps dtype names as PyTorch spells them without the ``torch.`` prefix
    (``"float32"``, ``"bfloat16"``, ...) to peak FLOP/s. It must contain ``"float32"``, the
    fallback for any dtype it does not list. Achieved rates are peak times the efficiencies.
    ``op_classes`` maps names from :data:`OP_CLASSES` to measured per-class floors
    (:class:`OpClassRate`); an op of a class the profile lists costs the larger of its roofline
    and that floor. Datasheet profiles leave it empty.

    ``matmul_launch_seconds``, when set, is a matmul's fixed cost instead of
    ``kernel_launch_seconds``. ``matmul_weight_bytes_per_s``, when set, is the rate at which a matmul fetches its weight
    (its second matrix), last read a whole forward ago, on top of its compute: a CPU does not
    hide that fetch behind the arithmetic of a small matmul. It is why halving a matmul's
    tokens does not halve its time while halving its weight does: on the 2-core CI VM a
    128x128x128 fp32 ``linear`` took 64 us inside a model's graph and a 256x128x128 one
    108 us, not 128. ``autotp calibrate`` measures both; datasheet profiles leave them unset.

    ``overlap_slowdown`` ``s >= 0``: while a collective communicates, compute beside it runs at
    ``1 / (1 + s)`` of its speed (``cost_models.exposed_seconds``). It is the device's, not the
    link's: what slows is the compute, which shares SMs and memory bandwidth with NCCL's kernels
    (or CPU cores with gloo's threads) whichever link the bytes take. ``autotp calibrate``
    measures it; 0 (the default) hides a collective fully behind as much compute.

    ``inter_node`` and ``devices_per_node`` come together or not at all. Without them every
    group of devices is priced on ``intra_node`` (a one-node profile). ``sources`` maps a field's
    dotted TOML path (``"memory.bytes_per_s"``) to where its number comes from.
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
    inter_node: LinkProfile | None = None
    devices_per_node: int | None = None
    sources: Mapping[str, str] = field(default_factory=FrozenMap)
    op_classes: Mapping[str, OpClassRate] = field(default_factory=FrozenMap)
    matmul_launch_seconds: float | None = None  # None: kernel_launch_seconds
    matmul_weight_bytes_per_s: float | None = None  # None: fetching a matmul's weight overlaps its compute
    overlap_slowdown: float = 0.0  # compute runs at 1 / (1 + this) while a collective communicates (cost_models.overlap)

    def __post_init__(self) -> None:
        table = check_flops_table(self.peak_flops_per_s, where="HardwareProfile", name="peak_flops_per_s")
        object.__setattr__(self, "peak_flops_per_s", table)
        _validate_fields(self, _HARDWARE_FIELD_CHECKS, owner="HardwareProfile")
        for attr in ("intra_node", "inter_node"):
            link = getattr(self, attr)
            if not isinstance(link, LinkProfile) and not (attr == "inter_node" and link is None):
                raise _bad_field("HardwareProfile", attr, "a LinkProfile", link)
        if (self.inter_node is None) != (self.devices_per_node is None):
            raise ProfileError(
                "HardwareProfile: inter_node and devices_per_node go together: give both (a "
                "multi-node profile) or neither (every group priced on intra_node)"
            )
        if self.devices_per_node is not None:
            try:
                object.__setattr__(self, "devices_per_node", _positive_int(self.devices_per_node))
            except _Invalid as exc:
                raise _bad_field("HardwareProfile", "devices_per_node", str(exc), self.devices_per_node) from None
        sources = dict(self.sources)
        for key, text in sources.items():
            if not isinstance(text, str) or not text.strip():
                raise _bad_field("HardwareProfile", f"sources.{key}", "a non-empty string", text)
        object.__setattr__(self, "sources", FrozenMap(sources))
        classes = dict(self.op_classes)
        for name, rate in classes.items():
            if name not in OP_CLASSES:
                raise _bad_field("HardwareProfile", f"op_classes.{name}", f"one of {list(OP_CLASSES)}", name)
            if not isinstance(rate, OpClassRate):
                raise _bad_field("HardwareProfile", f"op_classes.{name}", "an OpClassRate", rate)
        object.__setattr__(self, "op_classes", FrozenMap(classes))

    def flops_per_s(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype`` (``"bfloat16"`` or ``"torch.bfloat16"``).

        A dtype the profile does not list falls back to the ``float32`` entry: for integer and
        bool ops (index arithmetic, masks) that is the general-purpose ALU rate, close enough
        for ops that are memory-bound anyway.
        """
        key = dtype.removeprefix("torch.")
        table = self.peak_flops_per_s
        return table[key] if key in table else table[_FALLBACK_DTYPE]

    def link_for_group(self, group_size: int, *, stride: int = 1) -> LinkProfile:
        """The link a group of ``group_size`` devices ``stride`` apart talks over.

        Devices are numbered node by node (device d lives on node d // devices_per_node), so a
        group spans ``group_size * stride`` consecutive device numbers and stays inside one node
        when that span fits in one (groups are aligned to node boundaries, as a device mesh's
        are). A group that crosses nodes is priced wholly on ``inter_node``: a ring is as slow
        as its slowest hop. E.g. 8 devices per node: a (2, 8) mesh's inner axis (8 devices,
        stride 1) is intra-node, its outer axis (2 devices, stride 8) inter-node.
        """
        if self.inter_node is None or self.devices_per_node is None:
            return self.intra_node
        return self.intra_node if group_size * stride <= self.devices_per_node else self.inter_node

    def link_for_axis(self, mesh_shape: Sequence[int], axis: int) -> LinkProfile:
        """The link of the groups along ``axis`` of a row-major device mesh of ``mesh_shape``."""
        shape = tuple(mesh_shape)
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis {axis} is out of range for a mesh of shape {shape}")
        axis %= len(shape)
        return self.link_for_group(shape[axis], stride=math.prod(shape[axis + 1:]))


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


def _optional(check: Callable[[object], object]) -> Callable[[object], object]:
    return lambda value: None if value is None else check(value)


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


def _collective_name(name: object, *, owner: str, attr: str) -> Collective:
    try:
        return parse_collective(name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ProfileError(f"{owner}: field '{attr}.{name}': {exc}") from None


def check_flops_table(value: object, *, where: str, name: str) -> FrozenMap:
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
    return FrozenMap(checked)


_LINK_FIELD_CHECKS: dict[str, Callable[[object], object]] = {
    "latency_seconds": _non_negative,
    "bytes_per_s": _positive,
    "call_overhead_seconds": _non_negative,
}
_OVERRIDE_FIELD_CHECKS: dict[str, Callable[[object], object]] = {
    name: _optional(check) for name, check in _LINK_FIELD_CHECKS.items()
}
_KNEE_FIELD_CHECKS: dict[str, Callable[[object], object]] = {
    "moved_nbytes": _positive,
    "bytes_per_s": _positive,
}
_OP_CLASS_FIELD_CHECKS: dict[str, Callable[[object], object]] = {
    "launch_seconds": _non_negative,
    "seconds_per_flop": _non_negative,
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
    "matmul_launch_seconds": _optional(_non_negative),
    "matmul_weight_bytes_per_s": _optional(_positive),
    "overlap_slowdown": _non_negative,
}


def increasing_knees(value: object) -> tuple[BandwidthKnee, ...]:
    """``value`` as a tuple of :class:`BandwidthKnee` in strictly increasing ``moved_nbytes``."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise _Invalid("a sequence of BandwidthKnee")
    knees = tuple(value)
    if not all(isinstance(k, BandwidthKnee) for k in knees):
        raise _Invalid("a sequence of BandwidthKnee")
    if any(b.moved_nbytes <= a.moved_nbytes for a, b in itertools.pairwise(knees)):
        raise _Invalid("knees in strictly increasing moved_nbytes (each starts past the one before)")
    return knees


def _validate_knees(obj: LinkProfile | CollectiveLink, *, owner: str) -> None:
    value = obj.bandwidth_knees
    try:
        object.__setattr__(obj, "bandwidth_knees", increasing_knees(value))
    except _Invalid as exc:
        raise _bad_field(owner, "bandwidth_knees", str(exc), value) from None


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
