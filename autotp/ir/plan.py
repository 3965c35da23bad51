"""The plan: a frozen record of what the solver chose and what it will cost.

Per node: op, module path, chosen strategy (one placement per mesh axis for every input and
output, ``MeshStrategy``), the conversions inserted on its inputs (kind, bytes, seconds) and its
compute estimate: the sites of ``autotp.comm.conversions.conversion_sites``, each listed on its
first consumer, as the rewriter emits it once. The plan records the mesh it was made for
(``Plan.mesh``: shape, axis names, inter-node axes).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from autotp.errors import ConfigError
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import Placements, Shard, format_placements
from autotp.ir.steps import Step
from autotp.ir.strategy import MeshStrategy, NodeKind
from autotp.ir.units import fmt_nbytes, fmt_seconds
from autotp.ir.values import TensorMeta, ValueRef


@dataclass(frozen=True, slots=True)
class Conversion:
    """One placement change of one tensor value before a consumer reads it."""

    value: ValueRef
    src: Placements  # one placement per mesh axis
    dst: Placements
    steps: tuple[Step, ...]
    nbytes: int  # size of the full (global) tensor
    bytes_per_rank: float  # what each rank sends, per the collective's algorithm (fwd + bwd)
    seconds: float  # forward, plus the conjugate backward when training: what the step pays, less hidden_seconds
    backward_only: bool = False  # the gradient all-reduce of an R input to split work (priced only if a gradient is expected)
    wake_seconds: float = 0.0  # part of seconds: its collectives' wake-up after the compute before them (autotp.cost.wake)
    hidden_seconds: float = 0.0  # not in seconds: communication hidden behind compute beside it (autotp.comm.overlap)

    @property
    def priced(self) -> bool:
        """False for a gradient sync the plan does not expect to run (no gradient reaches it in
        the planned model); it still runs, and costs, if one does (``autotp.comm.conversions``)."""
        return not (self.backward_only and self.seconds == 0.0 and self.bytes_per_rank == 0.0)

    @property
    def kind(self) -> str:
        if self.backward_only:
            return self.sync_kind if self.priced else f"{self.sync_kind} (only if a gradient flows)"
        return "+".join(step_label(s) for s in self.steps)

    @property
    def sync_kind(self) -> str:
        """A gradient sync's name: ``grad_all_reduce``, with ``@a,b`` for the mesh axes when not axis 0 alone."""
        return "grad_all_reduce" + axes_suffix(self.steps)

    @property
    def is_collective(self) -> bool:
        return any(s.kind.is_collective for s in self.steps)

    @property
    def in_forward(self) -> bool:
        return not self.backward_only


def step_label(step: Step) -> str:
    """A step's kind, with ``@a`` when it runs over mesh axis ``a != 0`` (as ``Step.__str__``):
    ``all_gather`` on a 1-D mesh, ``all_gather@1`` over axis 1 of an N-D one."""
    return f"{step.kind.value}@{step.axis}" if step.axis else step.kind.value


def axes_suffix(steps: tuple[Step, ...]) -> str:
    """``@a,b`` naming the mesh axes ``steps`` run over, ``""`` when that is axis 0 alone."""
    axes = sorted({s.axis for s in steps})
    return "" if axes in ([], [0]) else "@" + ",".join(str(a) for a in axes)


@dataclass(frozen=True, slots=True)
class NodePlan:
    name: str
    op: str
    module_path: str
    kind: NodeKind
    strategy: MeshStrategy
    conversions: tuple[Conversion, ...]
    compute_seconds: float
    inputs: tuple[ValueRef, ...] = ()  # the values it reads, as in the graph
    output_meta: TensorMeta | tuple[TensorMeta, ...] | None = None  # its output's global shape and dtype (one per output)

    @property
    def comm_seconds(self) -> float:
        return sum(c.seconds for c in self.conversions)


@dataclass(frozen=True, slots=True, repr=False)
class Plan:
    """What the solver chose for every node, and its estimated costs.

    ``str(plan)`` is the layout table of ``autotp plan`` (``autotp.report.table.format_table``:
    by module, repeated blocks collapsed); ``repr(plan)`` one line; ``summary()`` every split op.
    """

    mesh_shape: tuple[int, ...]
    hardware: str
    memory_budget: int | None
    nodes: tuple[NodePlan, ...]
    param_nbytes_per_device: float
    replicated_param_nbytes: float
    memory_nbytes_per_device: float  # parameters/buffers, plus gradients and optimizer state if training
    solver_status: str
    solve_seconds: float
    training: bool = False
    optimizer: str | None = None
    fingerprint: str = ""  # of the graph it was made for (autotp.io.fingerprint); "" skips the check
    cost_terms: tuple | None = None  # autotp.cost.symbolic terms behind cost_expression(); None unless asked for
    mesh_axis_names: tuple[str, ...] = ("tp",)
    inter_node_axes: tuple[int, ...] | None = None  # None: decided by the hardware profile (autotp.ir.mesh)
    overlap: bool = False  # priced (and run) with communication beside compute (autotp.comm.overlap)

    def __post_init__(self) -> None:
        if self.mesh_axis_names == ("tp",) and len(self.mesh_shape) != 1:
            object.__setattr__(self, "mesh_axis_names", MeshSpec.of(self.mesh_shape).names)
        if len(self.mesh_axis_names) != len(self.mesh_shape):
            raise ConfigError(f"a plan for the mesh shape {self.mesh_shape} needs one axis name per axis, got {self.mesh_axis_names}")

    @property
    def mesh(self) -> MeshSpec:
        """The mesh the plan was made for: axis sizes, names and inter-node axes."""
        return MeshSpec(tuple(self.mesh_shape), tuple(self.mesh_axis_names), self.inter_node_axes)

    @property
    def tp_size(self) -> int:
        """Ranks of a 1-D plan's mesh; ``ConfigError`` on an N-D plan (what reads it is 1-D-only)."""
        if len(self.mesh_shape) != 1:
            raise ConfigError(f"this needs a plan for a 1-D mesh; the plan is for the mesh {self.mesh}")
        return self.mesh_shape[0]

    def mesh_text(self) -> str:
        """The mesh as reports show it: ``(4,)`` for a 1-D plan, ``(dp=2, tp=4)`` for an N-D one."""
        return str(self.mesh_shape) if len(self.mesh_shape) == 1 else str(self.mesh)

    def to_dict(self) -> dict:
        """The JSON-ready form documented in docs/plan-format.md."""
        from autotp.io.plan_io import plan_to_dict

        return plan_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        from autotp.io.plan_io import plan_from_dict

        return plan_from_dict(data)

    def save(self, path: str) -> None:
        """Write the plan as JSON (docs/plan-format.md)."""
        from autotp.io.plan_io import save_plan

        save_plan(self, path)

    @classmethod
    def load(cls, path: str) -> Plan:
        """Read a plan written by ``save``; raises ``PlanFormatError`` on a malformed file."""
        from autotp.io.plan_io import load_plan

        return load_plan(path)

    def cost_expression(self):  # -> sympy.Expr
        """Total time as a sympy expression in batch ``B`` and sequence length ``T`` (``autotp.cost.symbolic``).

        Needs the plan's cost terms: ``autotp.plan(..., symbolic=True)`` or
        ``autotp.cost.symbolic.attach_cost_terms``. ``expr.subs({B: b, T: t})`` prices this plan's
        strategies at another size; at the planned size it equals ``total_seconds + hidden_seconds``
        (it does not model overlap: with ``overlap=False`` that is ``total_seconds``).
        """
        from autotp.cost.symbolic import expression

        return expression(self)

    @property
    def activation_nbytes_per_device(self) -> float:
        """Bytes of the largest set of simultaneously live activations on one rank (``autotp.cost.activations``)."""
        from autotp.cost.activations import activation_nbytes

        return activation_nbytes(self)

    @property
    def compute_seconds(self) -> float:
        return sum(n.compute_seconds for n in self.nodes)

    @property
    def comm_seconds(self) -> float:
        return sum(n.comm_seconds for n in self.nodes)

    @property
    def wake_seconds(self) -> float:
        """The part of ``comm_seconds`` that is collectives' wake-up after long compute (``autotp.cost.wake``)."""
        return sum(c.wake_seconds for _, c in self.conversions())

    @property
    def hidden_seconds(self) -> float:
        """Communication hidden behind compute (``overlap``): priced by the collectives, not in ``comm_seconds``."""
        return sum(c.hidden_seconds for _, c in self.conversions())

    @property
    def total_seconds(self) -> float:
        return self.compute_seconds + self.comm_seconds

    @property
    def comm_bytes_per_rank(self) -> float:
        return sum(c.bytes_per_rank for n in self.nodes for c in n.conversions)

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in this plan")

    def conversions(self) -> Iterator[tuple[NodePlan, Conversion]]:
        for n in self.nodes:
            for c in n.conversions:
                yield n, c

    def collectives(self, *, backward: bool = False) -> list[tuple[NodePlan, Conversion]]:
        """Forward conversions that communicate (local chunks and partial masks excluded);
        with ``backward`` also the gradient all-reduces that only run in backward."""
        return [(n, c) for n, c in self.conversions() if c.is_collective and (backward or c.in_forward)]

    def sharded_state(self) -> dict[str, Placements]:
        """Placements of every parameter/buffer placeholder that is split on some mesh axis."""
        return {
            n.name: n.strategy.output for n in self.nodes
            if n.kind is NodeKind.STATE and any(isinstance(p, Shard) for p in n.strategy.output)
        }

    def __repr__(self) -> str:
        mode = "training" if self.training else "inference"
        split = sum(1 for n in self.nodes if n.kind is NodeKind.OP and n.strategy.divides_output())
        return (
            f"Plan(mesh {self.mesh_text()} on {self.hardware}, {mode}, {len(self.nodes)} nodes, {split} ops split, "
            f"{len(self.collectives(backward=True))} collectives, est. {fmt_seconds(self.total_seconds)}, {self.solver_status})"
        )

    def __str__(self) -> str:
        from autotp.report.table import format_table

        return format_table(self)

    def summary(self) -> str:
        """A table of the ops that are split or communicate, then the totals."""
        rows = [("node", "module", "op", "strategy", "conversions", "est. time")]
        for n in self.nodes:
            if n.kind is NodeKind.OUTPUT and not n.conversions:
                continue
            if not n.conversions and n.strategy.replicated:
                continue
            conv = "; ".join(
                f"{c.value}:{format_placements(c.src)}->{format_placements(c.dst)} {c.kind} {fmt_nbytes(c.nbytes)}" for c in n.conversions
            )
            rows.append((n.name, n.module_path or "-", n.op.removeprefix("aten."), str(n.strategy), conv or "-", fmt_seconds(n.compute_seconds + n.comm_seconds)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_coll = len(self.collectives(backward=True))
        wake = f" (of which {fmt_seconds(self.wake_seconds)} wake-up after long compute)" if self.wake_seconds else ""
        hidden = f"; {fmt_seconds(self.hidden_seconds)} more hidden behind compute" if self.hidden_seconds else ""
        mode = f"training ({self.optimizer or 'no optimizer'}): forward + backward" if self.training else "inference: forward only"
        lines += [
            "",
            f"mesh {self.mesh_text()} on {self.hardware}, {mode}; solver {self.solver_status} in {self.solve_seconds:.2f}s",
            f"estimated time: {fmt_seconds(self.total_seconds)} (compute {fmt_seconds(self.compute_seconds)}, "
            f"communication {fmt_seconds(self.comm_seconds)} in {n_coll} collectives{wake}{hidden}, "
            f"{fmt_nbytes(self.comm_bytes_per_rank)} sent per rank)",
            f"parameter memory per device: {fmt_nbytes(self.param_nbytes_per_device)} "
            f"(replicated: {fmt_nbytes(self.replicated_param_nbytes)}); with gradients and optimizer state: "
            f"{fmt_nbytes(self.memory_nbytes_per_device)}"
            + (f"; budget {fmt_nbytes(self.memory_budget)}" if self.memory_budget is not None else ""),
            f"largest live activations per device: {fmt_nbytes(self.activation_nbytes_per_device)}"
            + (" (forward, with what autograd keeps for backward)" if self.training else " (forward)"),
        ]
        return "\n".join(lines)
