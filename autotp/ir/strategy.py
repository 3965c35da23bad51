"""What a strategy is: placements of an op's inputs and output, and the kinds of graph node that carry one."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from autotp.ir.placement import Placement, Replicate

OutputPlacement = Placement | tuple[Placement, ...]


class NodeKind(str, Enum):
    USER_INPUT = "user_input"
    STATE = "state"  # parameter, buffer or lifted constant: sliced once at conversion
    OP = "op"
    OUTPUT = "output"


@dataclass(frozen=True, slots=True)
class OpStrategy:
    """Placements of an op's tensor inputs (in argument order) and of its output."""

    inputs: tuple[Placement, ...]
    output: OutputPlacement

    def outputs(self) -> tuple[Placement, ...]:
        return self.output if isinstance(self.output, tuple) else (self.output,)

    def divides_output(self) -> bool:
        """The output is split or partial: each rank computes only part of it."""
        return any(not isinstance(p, Replicate) for p in self.outputs())

    def __str__(self) -> str:
        ins = ", ".join(str(p) for p in self.inputs)
        out = self.output
        out_s = "(" + ", ".join(str(p) for p in out) + ")" if isinstance(out, tuple) else str(out)
        return f"[{ins}] -> {out_s}"
