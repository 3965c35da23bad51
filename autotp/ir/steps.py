"""The steps a placement change is made of (``autotp.comm.redistribute`` lists them per change)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StepKind(str, Enum):
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    LOCAL_CHUNK = "local_chunk"
    TO_PARTIAL = "to_partial"

    @property
    def is_collective(self) -> bool:
        return self not in (StepKind.LOCAL_CHUNK, StepKind.TO_PARTIAL)


@dataclass(frozen=True, slots=True)
class Step:
    """One conversion step over one mesh axis's groups; ``src_dim``/``dst_dim`` are the tensor dims
    it splits or gathers."""

    kind: StepKind
    src_dim: int | None = None
    dst_dim: int | None = None
    axis: int = 0

    def __str__(self) -> str:
        dims = [str(d) for d in (self.src_dim, self.dst_dim) if d is not None]
        text = f"{self.kind.value}({', '.join(dims)})" if dims else self.kind.value
        return f"{text}@{self.axis}" if self.axis else text
