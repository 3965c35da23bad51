"""Fit a hardware profile to timings measured on the machine (``autotp calibrate``).

This module only fits and reports; ``autotp.cost.calibrate`` measures (it needs torch). The fits
are weighted least squares on *relative* error, so a 4 KiB message counts as much as a
256 MiB one and the latency terms are not drowned by the bandwidth terms:

    minimise Σ_i ((model_i - t_i) / t_i)²

* **Memory-bound kernel** (an elementwise add moving N bytes, a few KiB to tens of MiB):
  ``t = launch + N / W`` gives ``kernel_launch_seconds`` and ``memory.bytes_per_s`` (W).
* **Matmuls** of F FLOPs with a weight (second matrix) of N_w bytes:
  ``t = launch_mm + F / P + N_w · s_w``; P, the achieved FLOP/s per dtype, and the launch and
  s_w, the seconds per weight byte, which all dtypes share (``matmul_launch_seconds``,
  ``matmul_weight_bytes_per_s`` = 1 / s_w), by non-negative least squares. Each weight was
  last read a forward ago (``autotp.cost.calibrate``); on a CPU its fetch does not hide behind a
  small matmul's arithmetic. The profile prices a matmul as
  ``launch_mm + max(F / P, N / W) + N_w · s_w`` (``cost_models.matmul_seconds``).
  A measured profile states achieved rates, so both efficiencies are 1.0.
* **Op classes** (``cost_models.OP_CLASSES``): per class, ``t = launch_c + F · s_c`` over its
  samples (views: ``t = launch_c``; elementwise: the memory-bound kernel's samples), written as
  the profile's ``op_classes``, a floor under the roofline of every op of that class.
* **Each collective** over message sizes B and group sizes n:
  ``t = o + steps(n) · alpha + moved(n, B) / beta`` (``cost_models.comm``, ring/pairwise
  formulas). beta is fitted on the messages of at least 1 MiB, where it dominates; then o and
  alpha on the smaller ones, where they dominate, with beta held (one joint fit when fewer than
  two sizes reach 1 MiB). Over 4 KiB to 256 MiB a loopback or NIC is not quite one straight line
  (caches, protocol switches), and this split keeps each regime's error small instead of
  spreading the misfit over both. With a single group size, steps is a constant and o and alpha
  cannot be told apart: alpha is set to 0 and o takes the whole fixed cost.
* **Bandwidth knees** where the large messages bend (``cost_models.BandwidthKnee``): with o and
  alpha held, the bandwidth term ``c_0 · moved + Σ_i c_i · max(0, moved - k_i)`` is fitted on
  the messages of at least 1 MiB (relative error; 1/beta = c_0, 1/beta_i = c_0 + ... + c_i).
  Candidate k are the moved sizes measured there but the largest; knees are added greedily
  (each time the candidate that lowers Σ squared relative error most, after which every knee
  moves to another candidate if that lowers it further), up to three and no more than the
  large messages pay for: k knees are 2k + 1 numbers (k + 1 bandwidths, k positions), and need
  as many large messages. The gain and noise rules below keep a curve from bending to follow
  noise; out of sample, allowing the second knee that five large messages pay for halved the
  worst collective's error on the CI VM (17% to 7%). Each knee is kept only if it cuts
  that error by at least 30% and leaves every segment a positive bandwidth, and none once the
  fit is within 1% RMS: a straight line stays straight. When knees are found, o and alpha are
  fitted again on the small messages with the new bandwidth held, and the two fits alternate
  until they settle. Knees are in bytes moved per rank, so the group sizes share them.
* **The algorithm.** With two or more group sizes, a collective that has several algorithms
  (all_reduce, broadcast: ring or tree) is fitted under each, and the one with the smaller Σ
  squared relative error is kept and written to the link's ``algorithms``: the algorithms
  differ in how time grows with the group size.

* **The wake-up** (``cost_models.WakeCurve``): each collective, 128 KiB on all ranks, timed
  after 1, 2, 4 and 8 times the compute the collectives above follow. Its extra time over the
  first (the closest non-decreasing fit) at each measured gap is its wake curve:
  all_reduce's is the link's ``wake``, every other one its override's.
* **The overlap slowdown** (``HardwareProfile.overlap_slowdown``, :func:`fit_overlap`): a
  matmul loop alone (C, about twice the all-reduce), an all-reduce alone (T) and both
  started together (O); ``r = (O - C) / T`` clipped to [0, 0.95] is ``s / (1 + s)``
  (``cost_models.exposed_seconds``), so ``s = r / (1 - r)``, from the medians over repeats.

The link's own numbers are all-reduce's (the collective tensor parallelism calls most); every
other collective is written as a per-collective override (``[links.intra_node.<collective>]``),
because real implementations differ: gloo's broadcast streams bytes several times faster than
its all-gather on the same loopback.

The report gives, per collective, the fitted latency (o + steps · alpha at the largest group
size), bandwidth and knees (``32MiB:0.41GB/s``: past 32 MiB moved per rank, 0.41 GB/s), R² of
the fit on seconds, and the median relative error over all sizes and over messages of at least
1 MiB.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cost_models.algorithms import ALGORITHMS, Algorithm, Collective
from cost_models.comm import bytes_moved_per_rank, latency_steps, transfer_seconds
from cost_models.overlap import slowdown_from_timings
from cost_models.profile import OP_CLASSES, BandwidthKnee, CollectiveLink, HardwareProfile, LinkProfile, OpClassRate, WakeCurve

__all__ = [
    "CalibrationError",
    "CalibrationReport",
    "CollectiveFit",
    "CollectiveSample",
    "ComputeFit",
    "KernelSample",
    "OverlapSample",
    "WakeSample",
    "build_profile",
    "fit_collective",
    "fit_collective_algorithm",
    "fit_all",
    "fit_compute",
    "fit_overlap",
    "fit_wake",
]

LARGE_MESSAGE_NBYTES = 2**20  # the report's second error column: messages of at least 1 MiB
MAX_KNEES = 3
KNEE_MIN_GAIN = 0.3  # a knee must cut the large messages' Σ squared relative error by 30% ...
KNEE_NOISE = 0.01  # ... and a fit within 1% RMS of them needs none
KNEE_MESSAGES = 2  # large messages each knee needs beyond the first, which anchors 1/beta: a knee
# is two numbers, its position and its bandwidth (with 5 large messages, 2 knees; with 3, 1)
_SETTLE_ROUNDS = 50  # alternations of the bandwidth and fixed-cost fits (a handful suffice)


class CalibrationError(ValueError):
    """The measurements cannot be fitted (too few, or times that do not grow with size)."""


@dataclass(frozen=True, slots=True)
class KernelSample:
    """One timed kernel: ``kind`` is ``"matmul"``, ``"memory"`` or an op class; seconds per call.

    For an op class, ``flops`` is the cost model's count (one per output element; attention's
    ``4·B·H·Tq·Tk·D``; 0 for a view). For a matmul, ``weight_nbytes`` is its second matrix's size.
    """

    kind: str
    dtype: str
    flops: float
    nbytes: float
    seconds: float
    weight_nbytes: float = 0.0


@dataclass(frozen=True, slots=True)
class CollectiveSample:
    """One timed collective: full tensor size ``nbytes`` over ``group_size`` ranks (median seconds)."""

    collective: str
    group_size: int
    nbytes: float
    seconds: float


@dataclass(frozen=True, slots=True)
class WakeSample:
    """One collective (``collective`` of ``nbytes`` over ``group_size`` ranks) timed after ``gap_seconds`` of compute."""

    collective: str
    group_size: int
    nbytes: float
    gap_seconds: float
    seconds: float


@dataclass(frozen=True, slots=True)
class OverlapSample:
    """One repeat of the overlap probe: compute alone, an all-reduce alone and both started
    together (the slowest rank's seconds of each)."""

    compute_seconds: float
    comm_seconds: float
    overlapped_seconds: float


@dataclass(frozen=True, slots=True)
class CollectiveFit:
    collective: str
    group_sizes: tuple[int, ...]
    call_overhead_seconds: float
    latency_seconds: float
    bytes_per_s: float
    r2: float
    median_rel_error: float
    median_rel_error_large: float | None  # messages >= 1 MiB; None when none was measured
    n_samples: int
    bandwidth_knees: tuple[BandwidthKnee, ...] = ()
    algorithm: Algorithm | None = None  # None: the collective's default

    def fixed_seconds(self, group_size: int) -> float:
        """o + steps · alpha at ``group_size``: the time of an (almost) empty message."""
        return self.call_overhead_seconds + latency_steps(self.collective, group_size=group_size, algorithm=self.algorithm) * self.latency_seconds

    def predict(self, *, nbytes: float, group_size: int) -> float:
        moved = bytes_moved_per_rank(self.collective, nbytes=nbytes, group_size=group_size, algorithm=self.algorithm)
        return self.fixed_seconds(group_size) + transfer_seconds(moved, bytes_per_s=self.bytes_per_s, knees=self.bandwidth_knees)

    def knees_text(self) -> str:
        """``32MiB:0.41GB/s,128MiB:0.2GB/s`` (bytes moved per rank: bandwidth past them), ``-`` for none."""
        return ",".join(f"{_format_nbytes(k.moved_nbytes)}:{k.bytes_per_s / 1e9:.3g}GB/s" for k in self.bandwidth_knees) or "-"


def _format_nbytes(nbytes: float) -> str:
    """``33554432`` -> ``32MiB``, ``3e6`` -> ``2.86MiB``: three significant digits at most."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g}{unit}"
    return f"{nbytes:.3g}B"


@dataclass(frozen=True, slots=True)
class ComputeFit:
    kernel_launch_seconds: float
    memory_bytes_per_s: float
    memory_r2: float
    memory_median_rel_error: float
    flops_per_s: dict[str, float]
    matmul_median_rel_error: dict[str, float]
    op_classes: dict[str, OpClassRate]
    op_class_median_rel_error: dict[str, float]
    matmul_launch_seconds: float | None = None  # fixed cost of one matmul (None: kernel_launch_seconds)
    matmul_weight_bytes_per_s: float | None = None  # None: the weight's size explains none of a matmul's time


@dataclass(frozen=True, slots=True)
class CalibrationReport:
    compute: ComputeFit
    collectives: tuple[CollectiveFit, ...]  # one per collective, over every group size
    group_fits: tuple[CollectiveFit, ...] = ()  # one per collective and group size, when several were timed
    wake_samples: tuple[WakeSample, ...] = ()
    wake: Mapping[str, WakeCurve] = field(default_factory=dict)  # per collective, fit_wake of its samples
    overlap_samples: tuple[OverlapSample, ...] = ()
    overlap_slowdown: float | None = None  # fit_overlap of them; None when not measured

    def text(self) -> str:
        c = self.compute
        lines = [
            "compute:",
            f"  kernel launch floor  {c.kernel_launch_seconds * 1e6:9.2f} us",
            f"  memory bandwidth     {c.memory_bytes_per_s / 1e9:9.2f} GB/s   (R² {c.memory_r2:.3f}, median error {c.memory_median_rel_error:.1%})",
        ]
        for dtype, rate in c.flops_per_s.items():
            lines.append(f"  matmul {dtype:<13} {rate / 1e9:9.2f} GFLOP/s (median error {c.matmul_median_rel_error[dtype]:.1%})")
        if c.matmul_launch_seconds is not None:
            lines.append(f"  matmul launch        {c.matmul_launch_seconds * 1e6:9.2f} us")
        if c.matmul_weight_bytes_per_s is not None:
            lines.append(f"  matmul weight fetch  {c.matmul_weight_bytes_per_s / 1e9:9.2f} GB/s   (a matmul's weight, on top of its FLOPs)")
        for name, floor in c.op_classes.items():
            lines.append(
                f"  {name:<20} {floor.launch_seconds * 1e6:9.2f} us + {floor.seconds_per_flop * 1e9:.4f} ns/FLOP "
                f"(median error {c.op_class_median_rel_error[name]:.1%})"
            )
        if not self.collectives:  # one rank: kernels only
            return "\n".join(lines)
        lines += ["", "collectives (fitted on each; latency = o + steps·alpha at the largest group):",
                  f"  {'collective':<17} {'ranks':>5} {'latency':>10} {'bandwidth':>11} {'R²':>6} {'median err':>10} {'>=1MiB err':>10}  knees (moved per rank:bandwidth)"]
        lines += [_collective_row(f, max(f.group_sizes)) for f in self.collectives]
        if self.group_fits:
            lines += ["", "measured groups (fitted on one group size alone, kept where that fits it better than the joint fit):"]
            lines += [_collective_row(f, f.group_sizes[0]) for f in self.group_fits]
        if self.wake:
            probe = self.wake_samples[0]
            lines += ["", f"wake-up: each collective of {_format_nbytes(probe.nbytes)} on {probe.group_size} ranks after longer compute "
                          "(time; extra over the first gap, never decreasing):",
                      f"  {'collective':<17} " + "  ".join(f"after {g * 1e3:5.2f}ms" for g in next(iter(self.wake.values())).gaps_seconds)]
            for kind, curve in self.wake.items():
                timed = sorted((s for s in self.wake_samples if s.collective == kind), key=lambda s: s.gap_seconds)
                lines.append(f"  {kind:<17} " + "  ".join(f"{s.seconds * 1e3:5.2f} {e * 1e3:+5.2f}ms" for s, e in zip(timed, curve.extra_seconds)))
        if self.overlap_slowdown is not None:
            o = self.overlap_samples[len(self.overlap_samples) // 2]
            lines += ["", f"overlap: compute runs at 1/(1 + {self.overlap_slowdown:.3f}) beside a collective (median of {len(self.overlap_samples)}; "
                          f"e.g. compute {o.compute_seconds * 1e3:.2f} ms, all-reduce {o.comm_seconds * 1e3:.2f} ms, both {o.overlapped_seconds * 1e3:.2f} ms)"]
        return "\n".join(lines)


def _collective_row(f: CollectiveFit, n: int) -> str:
    large = "-" if f.median_rel_error_large is None else f"{f.median_rel_error_large:.1%}"
    return (
        f"  {f.collective + ('' if f.algorithm is None else f' ({f.algorithm.value})'):<17} {n:>5} {f.fixed_seconds(n) * 1e6:>8.1f}us {f.bytes_per_s / 1e9:>7.3f}GB/s "
        f"{f.r2:>6.3f} {f.median_rel_error:>10.1%} {large:>10}  {f.knees_text()}"
    )


# --------------------------------------------------------------------------------------------
# Least squares


def _weighted_lstsq(rows: Sequence[Sequence[float]], targets: Sequence[float], scales: Sequence[float] | None = None) -> list[float]:
    """Minimise Σ ((row·x - target) / scale)² via the normal equations (a handful of unknowns).

    ``scales`` defaults to the targets: least squares on relative error.
    """
    k = len(rows[0])
    scales = targets if scales is None else scales
    scaled = [[v / w for v in row] for row, w in zip(rows, scales)]
    rhs = [t / w for t, w in zip(targets, scales)]
    ata = [[sum(r[i] * r[j] for r in scaled) for j in range(k)] for i in range(k)]
    atb = [sum(r[i] * b for r, b in zip(scaled, rhs)) for i in range(k)]
    for col in range(k):  # Gaussian elimination with partial pivoting
        pivot = max(range(col, k), key=lambda r: abs(ata[r][col]))
        if abs(ata[pivot][col]) < 1e-300:
            raise CalibrationError("the measurements do not determine the fit (too few distinct sizes)")
        ata[col], ata[pivot] = ata[pivot], ata[col]
        atb[col], atb[pivot] = atb[pivot], atb[col]
        for r in range(k):
            if r != col:
                factor = ata[r][col] / ata[col][col]
                ata[r] = [a - factor * b for a, b in zip(ata[r], ata[col])]
                atb[r] -= factor * atb[col]
    return [atb[i] / ata[i][i] for i in range(k)]


def _nonnegative_lstsq(rows: Sequence[Sequence[float]], targets: Sequence[float], *, keep: int | None, scales: Sequence[float] | None = None) -> list[float]:
    """Weighted least squares, dropping (setting to 0) negative coefficients other than ``keep``."""
    active = list(range(len(rows[0])))
    while True:
        if not active:
            return [0.0] * len(rows[0])
        sub = _weighted_lstsq([[row[i] for i in active] for row in rows], targets, scales)
        negative = [i for i, x in zip(active, sub) if x < 0 and i != keep]
        if not negative:
            full = [0.0] * len(rows[0])
            for i, x in zip(active, sub):
                full[i] = x
            return full
        active.remove(min(negative, key=lambda i: sub[active.index(i)]))


def _r2(predicted: Sequence[float], measured: Sequence[float]) -> float:
    mean = statistics.fmean(measured)
    total = sum((m - mean) ** 2 for m in measured)
    residual = sum((m - p) ** 2 for m, p in zip(measured, predicted))
    return 1.0 - residual / total if total > 0 else 1.0


def _median_rel_error(predicted: Sequence[float], measured: Sequence[float]) -> float:
    return statistics.median(abs(p - m) / m for p, m in zip(predicted, measured))


def _check(samples: Sequence[object], what: str, minimum: int) -> None:
    if len(samples) < minimum:
        raise CalibrationError(f"{what}: {len(samples)} measurements, need at least {minimum}")
    for s in samples:
        if not (math.isfinite(s.seconds) and s.seconds > 0):  # type: ignore[attr-defined]
            raise CalibrationError(f"{what}: a measured time is not a positive number: {s}")


# --------------------------------------------------------------------------------------------
# Fits


def _bandwidth_fit(moved: Sequence[float], residual: Sequence[float], times: Sequence[float], knees_at: Sequence[float]) -> tuple[float, list[float]] | None:
    """``(loss, [1/beta, 1/beta_1, ...])`` of ``residual ≈ c_0·moved + Σ c_i·max(0, moved - k_i)``.

    ``residual`` is the time less the fixed part; the loss is Σ squared error relative to
    ``times``. None when the knees leave the fit undetermined or a segment's bandwidth <= 0.
    """
    rows = [[m, *(max(0.0, m - k) for k in knees_at)] for m in moved]
    try:
        c = _weighted_lstsq(rows, residual, times)
    except CalibrationError:
        return None
    inverse = list(itertools.accumulate(c))
    if min(inverse) <= 0:
        return None
    loss = sum(((sum(a * b for a, b in zip(row, c)) - r) / t) ** 2 for row, r, t in zip(rows, residual, times))
    return loss, inverse


_KneeFit = tuple[tuple[float, ...], tuple[float, list[float]]]  # (knee positions, (loss, inverse bandwidths))


def _choose_knees(moved: Sequence[float], residual: Sequence[float], times: Sequence[float]) -> tuple[float, tuple[BandwidthKnee, ...]] | None:
    """``(1/beta, knees)`` for the large messages (the module docstring's rule); None: no knee helps."""

    def best_of(options: Iterable[tuple[float, ...]]) -> _KneeFit | None:
        fits = [(at, fit) for at in options if (fit := _bandwidth_fit(moved, residual, times, at)) is not None]
        return min(fits, key=lambda f: f[1][0], default=None)

    candidates = sorted(set(moved))[:-1]
    most = min(MAX_KNEES, (len(times) - 1) // KNEE_MESSAGES)
    chosen = best_of([()])
    while chosen is not None and len(chosen[0]) < most and chosen[1][0] > len(times) * KNEE_NOISE**2:
        at, (loss, _) = chosen
        added = best_of(tuple(sorted((*at, k))) for k in candidates if k not in at)
        if added is None or added[1][0] > (1 - KNEE_MIN_GAIN) * loss:
            break
        chosen = added
        while True:  # a pair of knees can beat the best single knee and its best partner
            at = chosen[0]
            moved_one = best_of(tuple(sorted({*at} - {old} | {new})) for old in at for new in candidates if new not in at)
            if moved_one is None or moved_one[1][0] >= chosen[1][0]:
                break
            chosen = moved_one
    if chosen is None or not chosen[0]:
        return None
    at, (_, inverse) = chosen
    return inverse[0], tuple(BandwidthKnee(k, 1.0 / v) for k, v in zip(at, inverse[1:]))


def fit_collective(samples: Sequence[CollectiveSample], *, algorithm: Algorithm | None = None) -> CollectiveFit:
    """o, alpha, beta and bandwidth knees of one collective from its timings (see the module
    docstring), priced as ``algorithm`` (default: the collective's default algorithm)."""
    kind = Collective(samples[0].collective).value
    _check(samples, kind, 2)
    if any(s.collective != kind for s in samples):
        raise CalibrationError(f"fit_collective got samples of several collectives: {sorted({s.collective for s in samples})}")
    groups = tuple(sorted({s.group_size for s in samples}))
    if groups[0] < 2:
        raise CalibrationError(f"{kind}: group sizes must be >= 2, got {groups}")
    times = [s.seconds for s in samples]
    moved = [bytes_moved_per_rank(kind, nbytes=s.nbytes, group_size=s.group_size, algorithm=algorithm) for s in samples]
    steps = [float(latency_steps(kind, group_size=s.group_size, algorithm=algorithm)) for s in samples]
    large = [i for i, s in enumerate(samples) if s.nbytes >= LARGE_MESSAGE_NBYTES]
    small = [i for i, s in enumerate(samples) if s.nbytes < LARGE_MESSAGE_NBYTES]
    fixed = (lambda i: [1.0, steps[i]]) if len(groups) > 1 else (lambda i: [1.0])  # one group: no alpha
    inverse_beta: float | None = None
    knees: tuple[BandwidthKnee, ...] = ()
    if len({samples[i].nbytes for i in large}) >= 2 and small:
        # beta where it dominates (>= 1 MiB), then o and alpha where they do, beta held
        inverse_beta = _nonnegative_lstsq([[*fixed(i), moved[i]] for i in large], [times[i] for i in large], keep=len(fixed(0)))[-1]
        fit_on, residual = small, [times[i] - moved[i] * inverse_beta for i in small]
        x = _nonnegative_lstsq([fixed(i) for i in fit_on], residual, keep=None, scales=[times[i] for i in fit_on])
        rounds = _SETTLE_ROUNDS if inverse_beta > 0 else 0  # times that do not grow are refused below
        for _ in range(rounds):  # knees with o and alpha held, then o and alpha with the knees held
            rest = [times[i] - sum(a * b for a, b in zip(fixed(i), x)) for i in large]
            chosen = _choose_knees([moved[i] for i in large], rest, [times[i] for i in large])
            if chosen is None:
                break
            inverse_beta, knees = chosen
            residual = [times[i] - transfer_seconds(moved[i], bytes_per_s=1.0 / inverse_beta, knees=knees) for i in small]
            before, x = x, _nonnegative_lstsq([fixed(i) for i in small], residual, keep=None, scales=[times[i] for i in small])
            if all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for a, b in zip(x, before)):
                break
    else:  # too few large messages: one joint fit over every size
        x = _nonnegative_lstsq([[*fixed(i), moved[i]] for i in range(len(samples))], times, keep=len(fixed(0)))
        inverse_beta = x.pop()
    o, alpha = x[0], (x[1] if len(groups) > 1 else 0.0)
    if inverse_beta <= 0:
        raise CalibrationError(f"{kind}: the measured times do not grow with the message size; measure larger messages")
    beta = 1.0 / inverse_beta
    fit = CollectiveFit(kind, groups, o, alpha, beta, 0.0, 0.0, None, len(samples), knees, algorithm)
    predicted = [fit.predict(nbytes=s.nbytes, group_size=s.group_size) for s in samples]
    large_fit = [(p, s.seconds) for p, s in zip(predicted, samples) if s.nbytes >= LARGE_MESSAGE_NBYTES]
    return CollectiveFit(
        kind, groups, o, alpha, beta,
        r2=_r2(predicted, times),
        median_rel_error=_median_rel_error(predicted, times),
        median_rel_error_large=_median_rel_error(*zip(*large_fit)) if large_fit else None,
        n_samples=len(samples),
        bandwidth_knees=knees,
        algorithm=algorithm,
    )


def _squared_relative_error(fit: CollectiveFit, samples: Sequence[CollectiveSample]) -> float:
    return sum((fit.predict(nbytes=s.nbytes, group_size=s.group_size) / s.seconds - 1) ** 2 for s in samples)


def fit_collective_algorithm(samples: Sequence[CollectiveSample]) -> CollectiveFit:
    """The fit under whichever of the collective's algorithms explains the timings best.

    Algorithms differ in how time grows with the group size (a tree broadcast sends
    ⌈log2 n⌉ copies, a ring one), so with two or more group sizes the data can tell them apart:
    gloo's broadcast on 4 ranks took twice its 2-rank time per byte, as a tree does. With one
    group size they coincide and the default is kept.
    """
    kind = Collective(samples[0].collective)
    if len({s.group_size for s in samples}) < 2 or len(ALGORITHMS[kind]) < 2:
        return fit_collective(samples)
    fits = []
    for algorithm in ALGORITHMS[kind]:
        try:
            fits.append(fit_collective(samples, algorithm=algorithm))
        except CalibrationError:
            continue
    if not fits:
        return fit_collective(samples)  # raises the default algorithm's error
    best = min(fits, key=lambda f: _squared_relative_error(f, samples))
    return best if best.algorithm is not ALGORITHMS[kind][0] else replace(best, algorithm=None)


def fit_compute(samples: Sequence[KernelSample]) -> ComputeFit:
    """Launch floor and memory bandwidth from the memory-bound kernel, then FLOP/s per dtype."""
    memory = [s for s in samples if s.kind == "memory"]
    _check(memory, "memory-bound kernel", 2)
    times = [s.seconds for s in memory]
    launch, inverse_w = _nonnegative_lstsq([[1.0, s.nbytes] for s in memory], times, keep=1)
    if inverse_w <= 0:
        raise CalibrationError("memory-bound kernel: the times do not grow with the size; measure larger tensors")
    predicted = [launch + s.nbytes * inverse_w for s in memory]
    matmuls = [s for s in samples if s.kind == "matmul"]
    dtypes = sorted({s.dtype for s in matmuls})
    if "float32" not in dtypes:
        raise CalibrationError("no float32 matmul was measured; the profile needs a float32 rate")
    matmul_launch, flops, seconds_per_weight_byte = _fit_matmuls(matmuls, dtypes, inverse_w, launch)
    launch_mm = launch if matmul_launch is None else matmul_launch
    errors: dict[str, float] = {}
    for dtype in dtypes:
        of_dtype = [s for s in matmuls if s.dtype == dtype]
        model = [launch_mm + max(s.flops / flops[dtype], s.nbytes * inverse_w) + s.weight_nbytes * seconds_per_weight_byte for s in of_dtype]
        errors[dtype] = _median_rel_error(model, [s.seconds for s in of_dtype])
    classes, class_errors = _fit_op_classes(samples)
    weight_rate = 1.0 / seconds_per_weight_byte if seconds_per_weight_byte > 0 else None
    return ComputeFit(launch, 1.0 / inverse_w, _r2(predicted, times), _median_rel_error(predicted, times), flops, errors, classes, class_errors,
                      matmul_launch, weight_rate)


def _fit_matmuls(matmuls: Sequence[KernelSample], dtypes: Sequence[str], inverse_w: float, launch: float) -> tuple[float | None, dict[str, float], float]:
    """The launch all dtypes share (None: too few samples, ``launch`` taken), per dtype the
    achieved FLOP/s, and the seconds per weight byte of

        t = launch_mm + F / P[dtype] + weight_nbytes · s_w

    by non-negative least squares on relative error, on the samples the fit finds compute-bound
    (F / P >= N / W: a matmul small enough to be memory-bound says nothing about P), refitted
    until that set settles. s_w = 0 when the weight's size explains nothing, as when fetching
    it overlaps the compute, or when no sample says its weight's size. A grid too small for
    every number fits fewer: first without the weight, then with ``launch`` (the memory-bound
    kernel's) for the matmuls'."""
    weights = any(s.weight_nbytes > 0 for s in matmuls) and len(matmuls) >= len(dtypes) + 2
    free_launch = len(matmuls) >= len(dtypes) + 1 + weights
    kept = list(matmuls)
    for _ in range(5):  # settles in one or two refits; never cycle
        rows = [[1.0] * free_launch + [s.flops if s.dtype == d else 0.0 for d in dtypes] + ([s.weight_nbytes] if weights else []) for s in kept]
        targets = [s.seconds if free_launch else max(s.seconds - launch, 0.01 * s.seconds) for s in kept]
        numbers = _nonnegative_lstsq(rows, targets, keep=None, scales=[s.seconds for s in kept])
        matmul_launch = numbers.pop(0) if free_launch else None
        seconds_per_weight_byte = numbers.pop() if weights else 0.0
        inverse_rates = numbers
        if any(x <= 0 for x in inverse_rates):
            bad = dtypes[next(i for i, x in enumerate(inverse_rates) if x <= 0)]
            raise CalibrationError(f"matmul {bad}: the times do not grow with the FLOPs; measure larger matmuls")
        per_flop = dict(zip(dtypes, inverse_rates))
        bound = [s for s in matmuls if s.flops * per_flop[s.dtype] >= s.nbytes * inverse_w]
        if bound == kept or any(sum(s.dtype == d for s in bound) < 2 for d in dtypes) or len(bound) < len(rows[0]):
            break
        kept = bound
    return matmul_launch, {d: 1.0 / x for d, x in per_flop.items()}, seconds_per_weight_byte


def _fit_op_classes(samples: Sequence[KernelSample]) -> tuple[dict[str, OpClassRate], dict[str, float]]:
    """``t = launch + F · s`` per op class measured (elementwise from the memory-bound kernel)."""
    rates: dict[str, OpClassRate] = {}
    errors: dict[str, float] = {}
    for name in OP_CLASSES:
        kind = "memory" if name == "elementwise" else name
        measured = [s for s in samples if s.kind == kind]
        if not measured:
            continue
        times = [s.seconds for s in measured]
        if name == "view":  # dispatch only: no work to scale with
            rate = OpClassRate(statistics.median(times), 0.0)
        else:
            _check(measured, f"op class {name}", 2)
            rate = OpClassRate(*_nonnegative_lstsq([[1.0, s.flops] for s in measured], times, keep=None))
        rates[name] = rate
        errors[name] = _median_rel_error([rate.seconds(s.flops) for s in measured], times)
    return rates, errors


def _non_decreasing(values: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing fit to ``values`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def fit_wake(samples: Sequence[WakeSample]) -> WakeCurve | None:
    """The wake curve of one collective timed after increasing gaps; None for fewer than 2.

    Its times, fitted by the closest non-decreasing sequence (least squares), less the first:
    a longer idle stretch makes a collective cheaper only by noise, and noise should not tell
    the planner that a longer gap is cheaper than a shorter one, nor lift the whole curve the
    way a running maximum of noisy times would.
    """
    ordered = sorted(samples, key=lambda s: s.gap_seconds)
    if len(ordered) < 2:
        return None
    gaps = [s.gap_seconds for s in ordered]
    if any(b <= a for a, b in itertools.pairwise(gaps)):
        raise CalibrationError(f"wake-up of {ordered[0].collective}: the gaps before it must differ, measured {gaps}")
    fitted = _non_decreasing([s.seconds for s in ordered])
    return WakeCurve(tuple(gaps), (0.0, *(max(0.0, f - fitted[0]) for f in fitted[1:])))


def fit_overlap(samples: Sequence[OverlapSample]) -> float | None:
    """The compute slowdown beside a collective (``HardwareProfile.overlap_slowdown``) from the
    medians over repeats of C, T and O: ``cost_models.slowdown_from_timings`` (``r = (O - C) / T``
    clipped to [0, 0.95], ``s = r / (1 - r)``); None without samples. Medians of each, not of
    per-repeat ratios: one slow all-reduce (a loaded 2-core VM timed 0.3 to 4.3 ms for the same
    256 KiB) swings a repeat's ratio far more than it moves T's median."""
    if not samples:
        return None
    return slowdown_from_timings(
        compute_seconds=statistics.median(s.compute_seconds for s in samples),
        comm_seconds=statistics.median(s.comm_seconds for s in samples),
        overlapped_seconds=statistics.median(s.overlapped_seconds for s in samples),
    )


def fit_all(
    kernels: Sequence[KernelSample], collectives: Iterable[CollectiveSample], wake: Sequence[WakeSample] = (), *, overlap: Sequence[OverlapSample] = (),
) -> CalibrationReport:
    """Every fit, in a report (collectives in ``Collective`` order)."""
    by_kind: dict[str, list[CollectiveSample]] = {}
    for s in collectives:
        by_kind.setdefault(Collective(s.collective).value, []).append(s)
    fits = tuple(fit_collective_algorithm(by_kind[c.value]) for c in Collective if c.value in by_kind)
    if not any(f.collective == Collective.ALL_REDUCE.value for f in fits):
        raise CalibrationError("all_reduce was not measured; the link's own numbers come from it")
    curves = {c.value: fit_wake([s for s in wake if s.collective == c.value]) for c in Collective}
    return CalibrationReport(
        fit_compute(kernels), fits, _group_fits(fits, by_kind), tuple(wake), {k: v for k, v in curves.items() if v is not None},
        tuple(overlap), fit_overlap(overlap),
    )


def _group_fits(fits: Sequence[CollectiveFit], by_kind: Mapping[str, Sequence[CollectiveSample]]) -> tuple[CollectiveFit, ...]:
    """Each collective fitted on each group size alone, under the algorithm the joint fit chose.

    The joint fit prices group sizes that were not timed; these price the ones that were. A
    group keeps the joint fit where that prices its timings better (fitted alone, a group has
    half the large messages, so fewer knees), or where they cannot be fitted alone.
    """
    out = []
    for f in fits:
        if len(f.group_sizes) < 2:
            continue
        for n in f.group_sizes:
            samples = [s for s in by_kind[f.collective] if s.group_size == n]
            try:
                alone = fit_collective(samples, algorithm=f.algorithm)
            except CalibrationError:
                continue
            if _squared_relative_error(alone, samples) < _squared_relative_error(f, samples):
                out.append(alone)
    return tuple(out)


def _link_numbers(f: CollectiveFit) -> dict[str, Any]:
    return {"call_overhead_seconds": f.call_overhead_seconds, "latency_seconds": f.latency_seconds, "bytes_per_s": f.bytes_per_s, "bandwidth_knees": f.bandwidth_knees}


def _link_from_fits(fits: Mapping[str, CollectiveFit], algorithms: Mapping[str, str], wake: Mapping[str, WakeCurve], measured_groups: Mapping[int, LinkProfile] | None = None) -> LinkProfile:
    """A link whose own numbers (and wake curve) are all_reduce's, with a per-collective table for every other fit."""
    overrides = {kind: CollectiveLink(**_link_numbers(f), wake=wake.get(kind)) for kind, f in fits.items() if kind != Collective.ALL_REDUCE.value}
    return LinkProfile(**_link_numbers(fits[Collective.ALL_REDUCE.value]), collectives=overrides, algorithms=algorithms,
                       measured_groups=measured_groups or {}, wake=wake.get(Collective.ALL_REDUCE.value))


def _measured_group_links(report: CalibrationReport, algorithms: Mapping[str, str]) -> dict[int, LinkProfile]:
    """One link per group size with a collective fitted alone; a collective that was not
    keeps its joint numbers there, and every group the one wake curve (measured on all ranks)."""
    by_kind = {f.collective: f for f in report.collectives}
    groups = sorted({f.group_sizes[0] for f in report.group_fits})
    return {n: _link_from_fits({**by_kind, **{f.collective: f for f in report.group_fits if f.group_sizes == (n,)}}, algorithms, report.wake) for n in groups}


def build_profile(
    report: CalibrationReport,
    *,
    name: str,
    device_type: str,
    memory_capacity_nbytes: int,
    description: str,
) -> HardwareProfile:
    """A one-node profile holding the fitted numbers, with a source for each.

    ``description`` says where and how it was measured (host, ranks, backend, date); it is
    the profile's ``source`` and starts every entry of ``sources``.
    """
    c = report.compute
    by_kind = {f.collective: f for f in report.collectives}
    base = by_kind[Collective.ALL_REDUCE.value]
    algorithms = {f.collective: f.algorithm.value for f in report.collectives if f.algorithm is not None}
    groups = _measured_group_links(report, algorithms)
    link = _link_from_fits(by_kind, algorithms, report.wake, groups)
    measured = f"measured by autotp calibrate ({description})"
    sources = {
        "compute.peak_flops_per_s": f"{measured}: achieved matmul FLOP/s, least squares over the shape grid",
        "compute.compute_efficiency": "1.0: the measured rates are achieved rates",
        "compute.kernel_launch_seconds": f"{measured}: intercept of the memory-bound kernel's fit",
        "memory.bytes_per_s": f"{measured}: slope of the memory-bound kernel's fit",
        "memory.capacity_nbytes": f"{measured}: device memory (CPU: RAM / ranks)",
        "memory.efficiency": "1.0: the measured bandwidth is achieved bandwidth",
    }
    if c.matmul_launch_seconds is not None:
        sources["compute.matmul_launch_seconds"] = f"{measured}: intercept of the matmuls' fit over the shape grid"
    if c.matmul_weight_bytes_per_s is not None:
        sources["compute.matmul_weight_bytes_per_s"] = f"{measured}: least squares over the shape grid, with the FLOP/s (each weight last read a forward ago)"
    for op_class in c.op_classes:
        sources[f"compute.op_classes.{op_class}"] = f"{measured}: {op_class} ops, least squares (median error {c.op_class_median_rel_error[op_class]:.1%})"
    for number in ("latency_seconds", "bytes_per_s", "call_overhead_seconds", *(("bandwidth_knees",) if base.bandwidth_knees else ())):
        sources[f"links.intra_node.{number}"] = f"{measured}: all_reduce fit (R² {base.r2:.3f}, median error {base.median_rel_error:.1%})"
    for kind in link.collectives:
        f = by_kind[kind]
        sources[f"links.intra_node.{kind}"] = f"{measured}: {kind} fit (R² {f.r2:.3f}, median error {f.median_rel_error:.1%})"
    if link.algorithms:
        sources["links.intra_node.algorithms"] = f"{measured}: the algorithm whose cost fits the timings over the group sizes best"
    probe = f"of {report.wake_samples[0].nbytes:.0f} bytes on {report.wake_samples[0].group_size} ranks after each gap, extra over the first" if report.wake_samples else ""
    for kind in report.wake:
        path = "links.intra_node.wake" if kind == Collective.ALL_REDUCE.value else f"links.intra_node.{kind}.wake"
        sources[path] = f"{measured}: {kind} {probe}"
    if report.overlap_slowdown is not None:
        sources["compute.overlap_slowdown"] = (
            f"{measured}: a matmul loop beside an all-reduce on every rank against each alone, median of {len(report.overlap_samples)}"
        )
    for n in groups:
        fitted = ", ".join(f"{f.collective} {f.median_rel_error:.1%}" for f in report.group_fits if f.group_sizes == (n,))
        sources[f"links.intra_node.measured_groups.{n}"] = f"{measured}: each collective fitted on groups of {n} ranks alone (median error {fitted})"
    return HardwareProfile(
        name=name,
        device_type=device_type,
        peak_flops_per_s=c.flops_per_s,
        memory_bytes_per_s=c.memory_bytes_per_s,
        memory_capacity_nbytes=memory_capacity_nbytes,
        compute_efficiency=1.0,
        memory_efficiency=1.0,
        kernel_launch_seconds=c.kernel_launch_seconds,
        intra_node=link,
        source=measured,
        sources=sources,
        op_classes=c.op_classes,
        matmul_launch_seconds=c.matmul_launch_seconds,
        matmul_weight_bytes_per_s=c.matmul_weight_bytes_per_s,
        overlap_slowdown=report.overlap_slowdown if report.overlap_slowdown is not None else 0.0,  # unmeasured (one rank): the default
    )
