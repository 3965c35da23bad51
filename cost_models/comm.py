"""Alpha-beta cost of ring collectives within one group of devices.

One link hop carrying m bytes costs ``alpha + m / beta`` seconds (Hockney's model), alpha =
``LinkProfile.latency_seconds``, beta = ``LinkProfile.bytes_per_s``. A collective over a group of
n ranks runs in lock-step rounds in which every rank sends one message to one peer at the same
time, so its time is

    T = steps · alpha + bytes_moved_per_rank / beta

Convention, for every collective: ``nbytes`` (B below) is the size of the FULL tensor involved,
the unsharded one, i.e. the largest of input and output. Callers never pre-divide by n.

    collective       what each rank holds            steps      bytes_moved_per_rank
    all_reduce       B in  -> B out (summed)         2(n-1)     2(n-1)/n · B
    all_gather       B/n in -> B out                 (n-1)      (n-1)/n  · B
    reduce_scatter   B in  -> B/n out (summed)       (n-1)      (n-1)/n  · B
    all_to_all       B/n in -> B/n out (re-split)    (n-1)      (n-1)/n² · B

Derivations (ring algorithms, Patarasuk & Yuan 2009; Thakur, Rabenseifner & Gropp 2005):

* reduce_scatter: cut B into n chunks of B/n. In each of n-1 steps every rank passes one
  partially reduced chunk to its ring neighbour and adds the one it receives; after n-1 steps
  each rank owns one fully reduced chunk. Bytes sent per rank: (n-1)·B/n.
* all_gather: the mirror image: n-1 steps, each forwarding one B/n chunk around the ring.
* all_reduce: reduce_scatter then all_gather, 2(n-1) steps of B/n: 2(n-1)/n · B. This is
  within a factor (n-1)/n of the 2B lower bound for any all-reduce algorithm, which is why NCCL
  uses it for large messages. Worked example: n = 4, B = 1 GB moves 1.5 GB per rank; at
  450 GB/s that is 3.33 ms plus 6·alpha.
* all_to_all (pairwise exchange): each rank holds its B/n share, cut into n blocks of B/n²,
  one addressed to each rank; the block for itself stays. In round k = 1..n-1 rank r sends its
  block to rank (r+k) mod n, so each rank sends (n-1)·B/n² bytes in n-1 messages. This assumes
  a full-bisection fabric (NVSwitch, a single switch, loopback) where the simultaneous pairwise
  sends do not share wires; on a physical ring the far blocks would cross several hops.
  Compared with all_gather of the same tensor it moves n times fewer bytes, which is why
  S(0) -> S(1) by all_to_all beats gathering and slicing.

n == 1 costs nothing (no communication happens), and so does an empty tensor.
"""

from __future__ import annotations

import math
from enum import Enum

from cost_models.profile import LinkProfile

__all__ = ["Collective", "bytes_moved_per_rank", "collective_seconds", "latency_steps"]


class Collective(str, Enum):
    """The collectives the planner prices; values match ``torch.distributed`` function names."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"

    def __str__(self) -> str:
        return self.value


def _collective(kind: Collective | str) -> Collective:
    try:
        return Collective(kind)
    except ValueError:
        known = ", ".join(c.value for c in Collective)
        raise ValueError(f"unknown collective {kind!r}; expected one of: {known}") from None


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


def latency_steps(kind: Collective | str, *, group_size: int) -> int:
    """Rounds of messages per rank, the multiplier of alpha: 2(n-1) for all_reduce, else n-1."""
    kind = _collective(kind)
    n = _group_size(group_size)
    return 2 * (n - 1) if kind is Collective.ALL_REDUCE else n - 1


def bytes_moved_per_rank(kind: Collective | str, *, nbytes: float, group_size: int) -> float:
    """Bytes each rank sends (and receives), the numerator of the bandwidth term.

    ``nbytes`` is the full, unsharded tensor size B; with n = ``group_size``:
    all_reduce 2(n-1)/n·B, all_gather and reduce_scatter (n-1)/n·B, all_to_all (n-1)/n²·B.
    E.g. n = 4: all_reduce 1.5·B, all_gather 0.75·B, all_to_all 0.1875·B.
    """
    kind = _collective(kind)
    n = _group_size(group_size)
    size = _nbytes(nbytes)
    if kind is Collective.ALL_REDUCE:
        return 2 * (n - 1) * size / n
    if kind is Collective.ALL_TO_ALL:
        return (n - 1) * size / (n * n)
    return (n - 1) * size / n  # all_gather, reduce_scatter


def collective_seconds(
    link: LinkProfile, kind: Collective | str, *, nbytes: float, group_size: int
) -> float:
    """Seconds for one ring collective over ``group_size`` ranks joined by ``link`` hops.

        T = o + latency_steps · alpha + bytes_moved_per_rank / beta
        (o = link.call_overhead_seconds, alpha = link.latency_seconds, beta = link.bytes_per_s)

    e.g. all_reduce of B = 1e9 bytes on n = 4 over o = 0, alpha = 3e-6 s, beta = 4.5e11 B/s:
    6 · 3e-6 + 1.5e9 / 4.5e11 = 1.8e-5 + 3.333e-3 = 3.351e-3 s.
    ``nbytes`` is the full (unsharded) tensor size; n == 1 or nbytes == 0 costs 0.0.
    """
    moved = bytes_moved_per_rank(kind, nbytes=nbytes, group_size=group_size)
    if moved == 0.0:
        return 0.0
    steps = latency_steps(kind, group_size=group_size)
    return link.call_overhead_seconds + steps * link.latency_seconds + moved / link.bytes_per_s
