"""How one tensor lies across one mesh axis: replicated, split along a dim, or a partial sum.

Placements are frozen values and print as ``R``, ``S(d)`` and ``P``; ``d`` is always a
non-negative tensor dim.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Replicate:
    """Every rank holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True, slots=True)
class Shard:
    """Rank ``r`` holds the ``r``-th of ``tp_size`` equal contiguous chunks along ``dim``."""

    dim: int

    def __post_init__(self) -> None:
        if self.dim < 0:
            raise ValueError(f"Shard dim must be normalised to >= 0, got {self.dim}")

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True, slots=True)
class Partial:
    """Every rank holds a full-shape tensor; the true value is their sum."""

    def __str__(self) -> str:
        return "P"


Placement = Replicate | Shard | Partial

R = Replicate()
P = Partial()


def parse_placement(text: str) -> Placement:
    """Inverse of ``str``: ``"R"``, ``"P"`` or ``"S(2)"``."""
    text = text.strip()
    if text == "R":
        return R
    if text == "P":
        return P
    if text.startswith("S(") and text.endswith(")") and text[2:-1].isdigit():
        return Shard(int(text[2:-1]))
    raise ValueError(f"not a placement: {text!r} (expected R, P or S(<dim>))")


def is_sharded(placement: Placement) -> bool:
    return isinstance(placement, Shard)
