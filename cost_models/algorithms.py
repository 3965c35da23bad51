"""The collectives the cost model knows and the algorithms each can run with.

Shared by :mod:`cost_models.profile` (which validates per-collective link settings by these
names) and :mod:`cost_models.comm` (which prices them), so neither has to import the other's
internals.

    collective       algorithms              default
    all_reduce       ring, tree              ring
    all_gather       ring                    ring
    reduce_scatter   ring                    ring
    all_to_all       pairwise                pairwise
    broadcast        ring, tree              ring

A link may also name ``auto`` for a collective: the cheaper of its algorithms at each message
size and group size, which is how NCCL picks between ring and tree.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ALGORITHMS", "AUTO", "Algorithm", "Collective", "parse_algorithm", "parse_collective"]


class Collective(str, Enum):
    """The collectives the planner prices; values match ``torch.distributed`` function names."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    BROADCAST = "broadcast"

    def __str__(self) -> str:
        return self.value


class Algorithm(str, Enum):
    """How a collective moves its bytes (see :mod:`cost_models.comm` for each one's cost)."""

    RING = "ring"
    TREE = "tree"
    PAIRWISE = "pairwise"

    def __str__(self) -> str:
        return self.value


# The first algorithm of each tuple is the collective's default.
ALGORITHMS: dict[Collective, tuple[Algorithm, ...]] = {
    Collective.ALL_REDUCE: (Algorithm.RING, Algorithm.TREE),
    Collective.ALL_GATHER: (Algorithm.RING,),
    Collective.REDUCE_SCATTER: (Algorithm.RING,),
    Collective.ALL_TO_ALL: (Algorithm.PAIRWISE,),
    Collective.BROADCAST: (Algorithm.RING, Algorithm.TREE),
}

# Not an algorithm: "use the cheapest of this collective's algorithms for each call".
AUTO = "auto"


def parse_collective(kind: Collective | str) -> Collective:
    """``kind`` as a :class:`Collective`; ``ValueError`` listing the known ones otherwise."""
    try:
        return Collective(kind)
    except ValueError:
        known = ", ".join(c.value for c in Collective)
        raise ValueError(f"unknown collective {kind!r}; expected one of: {known}") from None


def parse_algorithm(kind: Collective, algorithm: Algorithm | str | None) -> Algorithm | str:
    """A concrete :class:`Algorithm` for ``kind``, or :data:`AUTO`; ``None`` is the default."""
    offered = ALGORITHMS[kind]
    if algorithm is None:
        return offered[0]
    if algorithm == AUTO:
        return AUTO
    try:
        chosen = Algorithm(algorithm)
    except ValueError:
        chosen = None
    if chosen not in offered:
        names = ", ".join([a.value for a in offered] + [AUTO])
        raise ValueError(f"{kind.value} has no algorithm {algorithm!r}; expected one of: {names}")
    return chosen
