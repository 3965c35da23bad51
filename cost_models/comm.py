"""Alpha-beta cost of collectives within one group of devices, per collective and algorithm.

One link hop carrying m bytes costs ``alpha + m / beta`` seconds (Hockney's model), alpha =
``latency_seconds``, beta = ``bytes_per_s`` of the link (or of that collective's override, see
``LinkProfile.alpha_beta``). A collective over a group of n ranks runs in lock-step rounds in
which every rank sends one message to one peer at the same time, so its time is

    T = o + steps · alpha + bytes_moved / beta
          + Σ_i max(0, bytes_moved - k_i) · (1/beta_i - 1/beta_{i-1})      (beta_0 = beta)

with ``o`` the fixed per-call overhead (launch, setup, completion; LogP's ``o``),
``bytes_moved`` the bytes on the busiest rank's path through the rounds, and knee i
(``LinkProfile.knees``) saying that past k_i bytes moved each further byte moves at beta_i:
bandwidth that drops once a message leaves the caches or a transport switches protocol.

Convention, for every collective: ``nbytes`` (B below) is the size of the FULL tensor involved,
the unsharded one, i.e. the largest of input and output. Callers never pre-divide by n.
L = ⌈log2 n⌉.

    collective      algorithm  what each rank holds           steps    bytes_moved
    all_reduce      ring       B in  -> B out (summed)        2(n-1)   2(n-1)/n · B
    all_reduce      tree       B in  -> B out (summed)        2L       2L · B
    all_gather      ring       B/n in -> B out                (n-1)    (n-1)/n  · B
    reduce_scatter  ring       B in  -> B/n out (summed)      (n-1)    (n-1)/n  · B
    all_to_all      pairwise   B/n in -> B/n out (re-split)   (n-1)    (n-1)/n² · B
    broadcast       ring       B on the root -> B everywhere  (n-1)    B
    broadcast       tree       B on the root -> B everywhere  L        L · B

Derivations (Patarasuk & Yuan 2009; Thakur, Rabenseifner & Gropp 2005):

* reduce_scatter (ring): cut B into n chunks of B/n. In each of n-1 steps every rank passes
  one partially reduced chunk to its ring neighbour and adds the one it receives; after n-1
  steps each rank owns one fully reduced chunk. Bytes sent per rank: (n-1)·B/n.
* all_gather (ring): the mirror image: n-1 steps, each forwarding one B/n chunk.
* all_reduce (ring): reduce_scatter then all_gather, 2(n-1) steps of B/n: 2(n-1)/n · B, within
  a factor (n-1)/n of the 2B lower bound for any all-reduce. Worked example: n = 4, B = 1 GB
  moves 1.5 GB per rank; at 450 GB/s that is 3.33 ms plus 6·alpha.
* all_reduce (tree): a binomial-tree reduce to rank 0 then a binomial-tree broadcast back,
  each L rounds of the whole B (Thakur et al. 2005, section 4, unpipelined). Fewer steps than
  the ring (2L against 2(n-1)) but L/(1-1/n) times the bytes: it wins for small messages on
  many ranks. E.g. n = 8: 6 steps and 6·B against 14 steps and 1.75·B.
* broadcast (ring): the root streams B in small chunks down a chain of n ranks (pipelined), so
  the bandwidth term is B/beta once and the pipeline fills in n-1 steps.
* broadcast (tree): binomial tree, L rounds in which every holder sends the whole B to one
  new rank.
* all_to_all (pairwise exchange): each rank holds its B/n share, cut into n blocks of B/n²,
  one addressed to each rank; the block for itself stays. In round k = 1..n-1 rank r sends its
  block to rank (r+k) mod n, so each rank sends (n-1)·B/n² bytes in n-1 messages. This assumes
  a full-bisection fabric (NVSwitch, a single switch, loopback) where the simultaneous pairwise
  sends do not share wires. Compared with all_gather of the same tensor it moves n times fewer
  bytes, which is why S(0) -> S(1) by all_to_all beats gathering and slicing.

For a fixed group and algorithm, T is continuous and piecewise linear in B for B > 0: with
bytes_moved = f · B, ``T = fixed + f/beta · B + Σ_i f · (1/beta_i - 1/beta_{i-1}) · max(0, B -
k_i / f)`` (:func:`collective_terms`), one straight line without knees; ``"auto"`` takes the
cheaper algorithm per call, a minimum of such curves. n == 1 costs nothing (no communication
happens), and so does an empty tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cost_models.algorithms import ALGORITHMS, AUTO, Algorithm, Collective, parse_algorithm, parse_collective
from cost_models.profile import BandwidthKnee, LinkProfile

__all__ = [
    "Algorithm",
    "Collective",
    "PiecewiseLinearCost",
    "bytes_moved_per_rank",
    "collective_seconds",
    "collective_terms",
    "latency_steps",
    "piecewise_linear_seconds",
    "select_algorithm",
    "transfer_seconds",
]


def _group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(
            f"group_size must be an int, got {type(group_size).__name__} {group_size!r}"
        )
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return group_size


def _nbytes(nbytes: float) -> float:
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)):
        raise TypeError(f"nbytes must be a number, got {type(nbytes).__name__} {nbytes!r}")
    if not math.isfinite(nbytes) or nbytes < 0:
        raise ValueError(f"nbytes must be a finite number >= 0, got {nbytes!r}")
    return float(nbytes)


def _concrete(kind: Collective, algorithm: Algorithm | str | None) -> Algorithm:
    chosen = parse_algorithm(kind, algorithm)
    if chosen == AUTO:
        raise ValueError(f"'auto' picks an algorithm per call; pass a link to collective_seconds, or name one of {[a.value for a in ALGORITHMS[kind]]}")
    return chosen  # type: ignore[return-value]


def _log2_rounds(n: int) -> int:
    return (n - 1).bit_length()  # ⌈log2 n⌉, 0 for n = 1


def latency_steps(kind: Collective | str, *, group_size: int, algorithm: Algorithm | str | None = None) -> int:
    """Rounds of messages, the multiplier of alpha (see the table in the module docstring)."""
    kind = parse_collective(kind)
    n = _group_size(group_size)
    algorithm = _concrete(kind, algorithm)
    if algorithm is Algorithm.TREE:
        return 2 * _log2_rounds(n) if kind is Collective.ALL_REDUCE else _log2_rounds(n)
    return 2 * (n - 1) if kind is Collective.ALL_REDUCE else n - 1


def _moved_fraction(kind: Collective, algorithm: Algorithm, n: int) -> float:
    """bytes_moved / B."""
    if n == 1:
        return 0.0
    if algorithm is Algorithm.TREE:
        return float(latency_steps(kind, group_size=n, algorithm=algorithm))
    if kind is Collective.ALL_REDUCE:
        return 2 * (n - 1) / n
    if kind is Collective.ALL_TO_ALL:
        return (n - 1) / (n * n)
    if kind is Collective.BROADCAST:
        return 1.0
    return (n - 1) / n  # all_gather, reduce_scatter


def bytes_moved_per_rank(
    kind: Collective | str, *, nbytes: float, group_size: int, algorithm: Algorithm | str | None = None
) -> float:
    """Bytes on the busiest rank's path, the numerator of the bandwidth term.

    ``nbytes`` is the full, unsharded tensor size B; with n = ``group_size`` and the default
    algorithms: all_reduce 2(n-1)/n·B, all_gather and reduce_scatter (n-1)/n·B, all_to_all
    (n-1)/n²·B, broadcast B. E.g. n = 4: all_reduce 1.5·B, all_gather 0.75·B, all_to_all
    0.1875·B; tree all_reduce 4·B.
    """
    kind = parse_collective(kind)
    n = _group_size(group_size)
    size = _nbytes(nbytes)
    return _moved_fraction(kind, _concrete(kind, algorithm), n) * size


def _knee_extras(bytes_per_s: float, knees: Sequence[BandwidthKnee]) -> list[tuple[float, float]]:
    """``(k_i, 1/beta_i - 1/beta_{i-1})`` per knee: where it starts, what each moved byte adds."""
    rates = [bytes_per_s, *(k.bytes_per_s for k in knees)]
    return [(k.moved_nbytes, 1.0 / rate - 1.0 / before) for k, before, rate in zip(knees, rates, rates[1:])]


def piecewise_linear_seconds(x: float, *, fixed: float, slope: float, knees: Sequence[tuple[float, float]] = ()) -> float:
    """``fixed + slope · x + Σ extra · max(0, x - at)`` over ``knees`` = ``(at, extra)`` pairs.

    The one place this sum is written: the planner's prices, calibration's fits and the
    symbolic terms all call it, so they agree to the last bit.
    """
    return fixed + slope * x + sum(extra * max(0.0, x - at) for at, extra in knees)


def transfer_seconds(moved_nbytes: float, *, bytes_per_s: float, knees: Sequence[BandwidthKnee] = ()) -> float:
    """Seconds to move ``moved_nbytes`` per rank: the bandwidth term of the collective's time.

        moved / beta + Σ_i max(0, moved - k_i) · (1/beta_i - 1/beta_{i-1})

    e.g. beta = 1e9 B/s, one knee at 1e6 bytes to 5e8 B/s: 3e6 bytes take 3e-3 + 2e6 · 1e-9 = 5e-3 s.
    """
    return piecewise_linear_seconds(moved_nbytes, fixed=0.0, slope=1.0 / bytes_per_s, knees=_knee_extras(bytes_per_s, knees))


@dataclass(frozen=True, slots=True)
class PiecewiseLinearCost:
    """``seconds(B) = fixed + seconds_per_byte · B + Σ extra · max(0, B - at)`` for B > 0, 0 for B == 0.

    ``knees`` holds ``(at, extra)`` per bandwidth knee, in bytes of the full tensor: from ``at``
    on, each byte costs ``extra`` seconds more (negative where bandwidth rises). Without knees
    it is a straight line.
    """

    algorithm: Algorithm
    fixed_seconds: float
    seconds_per_byte: float
    knees: tuple[tuple[float, float], ...] = ()

    def seconds(self, nbytes: float) -> float:
        if nbytes == 0:
            return 0.0
        return piecewise_linear_seconds(nbytes, fixed=self.fixed_seconds, slope=self.seconds_per_byte, knees=self.knees)


def collective_terms(
    link: LinkProfile, kind: Collective | str, *, group_size: int, algorithm: Algorithm | str | None = None
) -> tuple[PiecewiseLinearCost, ...]:
    """The cost curve of each algorithm ``kind`` may run on ``link``; the time is their minimum.

    ``algorithm=None`` uses the link's choice (``link.algorithm(kind)``); ``"auto"`` gives every
    algorithm the collective has. One curve for a concrete algorithm. Empty for n == 1.
    A group size the link was measured on is priced by that measurement (``LinkProfile.for_group``).
    With bytes_moved = f · B, a knee at k bytes moved starts at B = k / f and adds
    f · (1/beta_i - 1/beta_{i-1}) seconds per byte of B.
    """
    kind = parse_collective(kind)
    n = _group_size(group_size)
    if n == 1:
        return ()
    link = link.for_group(n)
    chosen = parse_algorithm(kind, link.algorithm(kind) if algorithm is None else algorithm)
    algorithms = ALGORITHMS[kind] if chosen == AUTO else (chosen,)
    o, alpha, beta = link.alpha_beta(kind)
    extras = _knee_extras(beta, link.knees(kind))
    fractions = {a: _moved_fraction(kind, a, n) for a in algorithms}  # type: ignore[arg-type]
    return tuple(
        PiecewiseLinearCost(
            algorithm=a,  # type: ignore[arg-type]  # parse_algorithm returned a known name
            fixed_seconds=o + latency_steps(kind, group_size=n, algorithm=a) * alpha,
            seconds_per_byte=f / beta,
            knees=tuple((at / f, f * extra) for at, extra in extras),
        )
        for a, f in fractions.items()
    )


def select_algorithm(
    link: LinkProfile, kind: Collective | str, *, nbytes: float, group_size: int
) -> Algorithm:
    """The algorithm ``kind`` runs with on ``link`` for this call (the cheapest under ``auto``)."""
    kind = parse_collective(kind)
    terms = collective_terms(link, kind, group_size=group_size)
    if not terms:
        return ALGORITHMS[kind][0]
    size = _nbytes(nbytes)
    return min(terms, key=lambda t: t.seconds(size)).algorithm


def collective_seconds(
    link: LinkProfile,
    kind: Collective | str,
    *,
    nbytes: float,
    group_size: int,
    algorithm: Algorithm | str | None = None,
) -> float:
    """Seconds for one collective over ``group_size`` ranks joined by ``link``.

        T = o + latency_steps · alpha + transfer_seconds(bytes_moved_per_rank, beta, knees)
        (o, alpha, beta = link.alpha_beta(kind), knees = link.knees(kind): the link's, or
        that collective's overrides)

    e.g. ring all_reduce of B = 1e9 bytes on n = 4 over o = 0, alpha = 3e-6 s, beta = 4.5e11
    B/s: 6 · 3e-6 + 1.5e9 / 4.5e11 = 1.8e-5 + 3.333e-3 = 3.351e-3 s.
    ``nbytes`` is the full (unsharded) tensor size; n == 1 or nbytes == 0 costs 0.0.
    ``algorithm=None`` runs what the link chooses; ``"auto"`` the cheapest for this call.
    """
    size = _nbytes(nbytes)
    terms = collective_terms(link, kind, group_size=group_size, algorithm=algorithm)
    if not terms or size == 0.0:
        return 0.0
    return min(t.seconds(size) for t in terms)


def wake_seconds(link: LinkProfile, kind: Collective | str, *, gap_seconds: float, group_size: int) -> float:
    """What one ``kind`` over ``group_size`` ranks costs beyond :func:`collective_seconds` when it
    follows ``gap_seconds`` of compute since the last collective (``LinkProfile.wake_curve``; 0 without one).

    A plan prices it per collective from its schedule (``autotp.cost.wake``): the solver cannot,
    since the gap depends on where the other collectives fall.
    """
    n = _group_size(group_size)
    wake = link.for_group(n).wake_curve(kind)
    return 0.0 if n == 1 or wake is None else wake.seconds(gap_seconds)
