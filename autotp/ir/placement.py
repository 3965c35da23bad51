"""How one tensor lies across one mesh axis: replicated, split along a dim, or a partial sum.

Placements are frozen values and print as ``R``, ``S(d)`` and ``P``; ``d`` is always a
non-negative tensor dim.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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


Placements = tuple[Placement, ...]
"""How one tensor lies across the whole mesh: one placement per mesh axis, in the mesh's axis
order (DTensor's ``placements``). ``(S(0), R)`` on a ``("dp", "tp")`` mesh splits dim 0 over
``dp`` and replicates over ``tp``. Axes that split the same dim nest in axis order: ``(S(0), S(0))`` on a (2, 2) mesh gives
the rank at (i, j) chunk ``2 * i + j`` of four (DTensor's order)."""


def format_placements(placements: Placements) -> str:
    """``"S(0)"`` on a 1-D mesh (one axis), ``"(S(0), R)"`` on an N-D one; ``parse_placements`` reads both."""
    if len(placements) == 1:
        return str(placements[0])
    return "(" + ", ".join(str(p) for p in placements) + ")"


def parse_placements(text: str) -> Placements:
    """Inverse of ``format_placements``."""
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        return tuple(parse_placement(part) for part in text[1:-1].split(","))  # "S(1)" holds no comma
    return (parse_placement(text),)


def chunk_index(
    shape: Sequence[int], placements: Placements, mesh_shape: Sequence[int], coordinate: Sequence[int],
) -> tuple[slice, ...]:
    """Where the part of a tensor of ``shape`` that the rank at ``coordinate`` holds lies in it, one
    slice per dim: ``S(d)`` on axis ``a`` takes chunk ``coordinate[a]`` of ``mesh_shape[a]`` along
    ``d`` (``torch.chunk``'s split, of what the outer axes left), ``R`` and ``P`` all of it.

    Nested splits of one dim stay contiguous, so a slice per dim says it all: readers of a
    checkpoint read exactly this part, and ``local_chunk`` cuts it from a full tensor.
    """
    bounds = [(0, size) for size in shape]
    for axis, p in enumerate(placements):
        if isinstance(p, Shard):
            start, stop = bounds[p.dim]
            step = -(-(stop - start) // mesh_shape[axis])  # torch.chunk: ceil-sized chunks, the last ones short or empty
            first = min(start + coordinate[axis] * step, stop)
            bounds[p.dim] = (first, min(first + step, stop))
    return tuple(slice(start, stop) for start, stop in bounds)


def local_chunk(full: torch.Tensor, placements: Placements, mesh_shape: Sequence[int], coordinate: Sequence[int]) -> torch.Tensor:
    """The part of ``full`` the rank at ``coordinate`` holds (a view: see ``chunk_index``)."""
    return full[chunk_index(full.shape, placements, mesh_shape, coordinate)]
