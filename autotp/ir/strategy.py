"""What a strategy is: placements of an op's inputs and output, and the kinds of graph node that carry one."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from autotp.ir.placement import Placement, Placements, Replicate, format_placements

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


@dataclass(frozen=True, slots=True)
class MeshStrategy:
    """An op's placements on every mesh axis: per input slot and per output, one placement per axis.

    Rules describe one axis (``OpStrategy``); the engine combines one rule answer per axis into a
    ``MeshStrategy`` (``from_axes``), and every stage after it (conversions, costs, the solver, the
    plan, the rewriter) reads these. On a 1-D mesh it prints as its single ``OpStrategy`` does.
    """

    inputs: tuple[Placements, ...]
    outputs: tuple[Placements, ...]
    multi_output: bool = False  # the op returns a tuple (read through getitem), even of one tensor

    @classmethod
    def from_axes(cls, axes: Sequence[OpStrategy]) -> MeshStrategy:
        """Combine one single-axis strategy per mesh axis (in axis order)."""
        first = axes[0]
        return cls(
            inputs=tuple(tuple(a.inputs[k] for a in axes) for k in range(len(first.inputs))),
            outputs=tuple(tuple(a.outputs()[k] for a in axes) for k in range(len(first.outputs()))),
            multi_output=isinstance(first.output, tuple),
        )

    @property
    def ndim(self) -> int:
        """Mesh axes (0 only for a node with neither inputs nor outputs, which has none)."""
        return len(self.outputs[0]) if self.outputs else len(self.inputs[0]) if self.inputs else 0

    def axis(self, axis: int) -> OpStrategy:
        """This strategy on one mesh axis, as a rule states it."""
        ins = tuple(p[axis] for p in self.inputs)
        outs = tuple(p[axis] for p in self.outputs)
        return OpStrategy(ins, outs if self.multi_output else outs[0])

    @property
    def axes(self) -> tuple[OpStrategy, ...]:
        return tuple(self.axis(a) for a in range(self.ndim))

    @property
    def output(self) -> Placements:
        """The placements of a single-output node's output (parameters, buffers, most ops)."""
        assert not self.multi_output, "a multi-output op has one placement per output: use outputs"
        return self.outputs[0]

    def output_at(self, index: int | None) -> Placements:
        """Placements of output ``index`` (``None``: the only output)."""
        return self.outputs[0 if index is None else index]

    @property
    def replicated(self) -> bool:
        """Every input and output whole on every axis: the all-``R`` strategy the engine adds."""
        return all(isinstance(p, Replicate) for placements in (*self.inputs, *self.outputs) for p in placements)

    def divides_output(self, axis: int | None = None) -> bool:
        """Each rank computes only part of the output on ``axis`` (on any axis when ``None``)."""
        axes = range(self.ndim) if axis is None else (axis,)
        return any(not isinstance(p[a], Replicate) for p in self.outputs for a in axes)

    def __str__(self) -> str:
        ins = ", ".join(format_placements(p) for p in self.inputs)
        outs = [format_placements(p) for p in self.outputs]
        out_s = "(" + ", ".join(outs) + ")" if self.multi_output else outs[0]
        return f"[{ins}] -> {out_s}"


def one_axis(strategy: OpStrategy) -> MeshStrategy:
    """A single-axis strategy as the ``MeshStrategy`` of a 1-D mesh (pins and layouts written for 1-D)."""
    return MeshStrategy.from_axes((strategy,))
