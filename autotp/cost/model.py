"""Stage 3: price strategies and transitions with ``cost_models`` (which knows nothing of graphs).

Compute is a roofline per op on the rank-local share of the work: a strategy that splits any
tensor divides FLOPs and bytes by ``tp_size``; all-replicate and partial-in/partial-out
strategies run the whole op on every rank. A profile with measured op classes (``autotp
calibrate`` writes them) floors each op by its class's rate (:func:`op_class`), views
included; without them views launch no kernel and cost nothing. A contraction also fetches
its weight (``cost_models.matmul_seconds``), all of it unless the strategy splits the weight,
when the profile gives a rate for that (a calibrated CPU profile does). A transition costs the
sum of its steps from ``redistribute.transition``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cost_models import (
    Collective,
    HardwareProfile,
    LinkProfile,
    ProfileError,
    WakeCurve,
    bytes_moved_per_rank,
    collective_seconds,
    hidden_seconds,
    load_profile,
    matmul_seconds,
    op_seconds,
    roofline_seconds,
    select_algorithm,
    state_nbytes,
    wake_seconds,
)
from autotp.comm.conversions import PricedStep
from autotp.comm.redistribute import Step, StepKind, backward_steps, grad_sync_step, step_placements, transition
from autotp.errors import ConfigError
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import Placements, Shard
from autotp.ir.strategy import MeshStrategy
from autotp.ir.values import TensorMeta, split_meta
from autotp.strategies.engine import NodeKind, NodeSpace
from autotp.strategies.op_facts import (
    CONTRACTION_OPS,
    CONVOLUTION_OPS,
    SECOND_MATRIX_SLOT,
    TRANSPOSED_CONVOLUTION_OPS,
    op_class_of,
    packet_name,
)

aten = torch.ops.aten

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def node_flops(node: NodeSpace) -> float:
    """Global FLOPs of one op: 2·M·N·K for contractions, 4·B·H·Tq·Tk·D for attention, for a
    convolution 2 per output element (input element, transposed) and weight entry of one output
    channel (``aten.convolution`` is taken as not transposed), else numel."""
    packet = packet_name(node.op)
    out = node.output_meta
    if (packet in CONVOLUTION_OPS or packet in TRANSPOSED_CONVOLUTION_OPS) and isinstance(out, TensorMeta):
        x, weight = node.slot_metas[0], node.slot_metas[1]
        return 2.0 * (x.numel if packet in TRANSPOSED_CONVOLUTION_OPS else out.numel) * (weight.numel / weight.shape[0])
    if packet in CONTRACTION_OPS and isinstance(out, TensorMeta):
        first_matrix = 1 if packet in ("aten.addmm", "aten.baddbmm") else 0  # after the bias
        contracted = node.slot_metas[first_matrix].shape[-1]
        return 2.0 * out.numel * contracted
    if packet == "aten.scaled_dot_product_attention" and isinstance(out, TensorMeta):
        q, k = node.slot_metas[0], node.slot_metas[1]
        batch_heads = math.prod(q.shape[:-2])
        return 4.0 * batch_heads * q.shape[-2] * k.shape[-2] * q.shape[-1]
    outs = out if isinstance(out, tuple) else (out,) if out is not None else ()
    return float(sum(m.numel for m in outs))


def op_class(node: NodeSpace) -> str | None:
    """The ``cost_models.OP_CLASSES`` entry whose measured floor prices ``node``; None for contractions."""
    return "view" if node.is_view else op_class_of(node.op)


def _weight_slot(node: NodeSpace) -> int | None:
    slot = SECOND_MATRIX_SLOT.get(packet_name(node.op))
    return slot if slot is not None and slot < len(node.slot_metas) else None


def node_weight_nbytes(node: NodeSpace) -> float:
    """Global bytes of a contraction's second matrix (its weight); 0 for any other op."""
    slot = _weight_slot(node)
    return 0.0 if slot is None else float(node.slot_metas[slot].nbytes)


def weight_share(node: NodeSpace, strategy: MeshStrategy, mesh_shape: tuple[int, ...]) -> int:
    """How many ranks split a contraction's weight under ``strategy`` (1: each holds all of it)."""
    slot = _weight_slot(node)
    return 1 if slot is None else split_count(strategy.inputs[slot], mesh_shape)


def split_count(placements: Placements, mesh_shape: tuple[int, ...]) -> int:
    """Into how many pieces ``placements`` split a tensor: the product of the sizes of the axes that shard it."""
    return math.prod(size for p, size in zip(placements, mesh_shape) if isinstance(p, Shard))


def node_nbytes(node: NodeSpace) -> float:
    out = node.output_meta
    outs = out if isinstance(out, tuple) else (out,) if out is not None else ()
    return float(sum(m.nbytes for m in node.slot_metas) + sum(m.nbytes for m in outs))


def work_share(strategy: MeshStrategy, mesh_shape: tuple[int, ...]) -> int:
    """Into how many parts ``strategy`` splits an op's work: the product of the sizes of the axes
    on which some input or output is split."""
    placements = (*strategy.inputs, *strategy.outputs)
    return math.prod(size for a, size in enumerate(mesh_shape) if any(isinstance(p[a], Shard) for p in placements))


_STEP_COLLECTIVE = {
    StepKind.ALL_REDUCE: Collective.ALL_REDUCE,
    StepKind.ALL_GATHER: Collective.ALL_GATHER,
    StepKind.REDUCE_SCATTER: Collective.REDUCE_SCATTER,
    StepKind.ALL_TO_ALL: Collective.ALL_TO_ALL,
}


# Backward of an op costs about twice its forward (gradients for the input and for the weight).
BACKWARD_COMPUTE_FACTOR = 2.0


@dataclass(frozen=True, slots=True)
class CostModel:
    """Seconds of each (node, strategy) and each placement transition on ``mesh``.

    With ``training`` the prices cover forward and backward: compute ×(1 + 2), each conversion
    plus its conjugate (``redistribute.backward_steps``) when the value needs a gradient, and
    the gradient all-reduce of ``R`` inputs to split compute. Memory counts gradients and
    ``optimizer`` state per parameter element.
    ``assumed_gap_seconds`` lets the solver see the
    wake-up (``autotp.cost.wake``) at one gap for all collectives; a plan is priced without it, from
    its own schedule. A step on mesh axis ``a`` runs over that axis's groups (``mesh.shape[a]``
    ranks) on its link (``axis_link``), moving the tensor as the other axes leave it (``axis_meta``).
    With ``overlap`` a collective is charged only what compute beside it does not hide
    (``cost_models.exposed_seconds``, at the profile's ``overlap_slowdown``): exactly when a
    plan is built (``autotp.solve.build``), and as a linear credit in the solver
    (:meth:`weight_grad_credit_seconds`).
    """

    profile: HardwareProfile
    mesh: MeshSpec
    training: bool = False
    optimizer: str | None = None
    assumed_gap_seconds: float | None = None  # solver only: charge every collective the wake-up after this much compute
    overlap: bool = True  # price communication hidden behind compute beside it (autotp.comm.overlap); False: all exposed
    # step_seconds by (step kind, bytes): a 70B graph prices a few sizes thousands of times. Not
    # an argument: ``dataclasses.replace`` (another gap) starts an empty one.
    _step_seconds: dict[tuple[StepKind, int, int], float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.mesh, int):  # a 1-D mesh by its size
            object.__setattr__(self, "mesh", MeshSpec.of(self.mesh))

    @property
    def tp_size(self) -> int:
        """Ranks of a 1-D mesh (the 1-D-only reports read it)."""
        if self.mesh.ndim != 1:
            raise ConfigError(f"this needs a 1-D mesh; the cost model is for the mesh {self.mesh}")
        return self.mesh.shape[0]

    def compute_seconds(self, node: NodeSpace, strategy: MeshStrategy) -> float:
        return self.kernel_seconds(node, strategy) + self.internal_comm_seconds(node, strategy)

    def kernel_seconds(self, node: NodeSpace, strategy: MeshStrategy) -> float:
        """The op's own compute (forward, and backward when training), without the collectives it runs inside."""
        if node.kind is not NodeKind.OP:
            return 0.0
        if node.is_view:  # no kernel; a calibrated profile charges the dispatch
            forward = op_seconds(self.profile, flops=0.0, nbytes=0.0, op_class="view")
        else:
            share = work_share(strategy, self.mesh.shape)
            dtype = _dtype_name(node.slot_metas[0].dtype if node.slot_metas else torch.float32)
            flops, nbytes, kind = node_flops(node) / share, node_nbytes(node) / share, op_class(node)
            if kind is None:  # a contraction, which also fetches its weight
                weight = node_weight_nbytes(node) / weight_share(node, strategy, self.mesh.shape)
                forward = matmul_seconds(self.profile, flops=flops, nbytes=nbytes, weight_nbytes=weight, dtype=dtype)
            else:
                forward = op_seconds(self.profile, flops=flops, nbytes=nbytes, dtype=dtype, op_class=kind)
        return forward * (1 + BACKWARD_COMPUTE_FACTOR) if self.training and node.requires_grad else forward

    def forward_kernel_seconds(self, node: NodeSpace, strategy: MeshStrategy) -> float:
        """The forward share of :meth:`kernel_seconds`: all of it unless training a node that
        needs a gradient, then ``1 / (1 + BACKWARD_COMPUTE_FACTOR)`` of it. A linear's weight
        gradient (``g^T x``) costs as much as its forward, so this is also that."""
        seconds = self.kernel_seconds(node, strategy)
        return seconds / (1 + BACKWARD_COMPUTE_FACTOR) if self.training and node.requires_grad else seconds

    def hidden_seconds(self, comm_seconds: float, compute_seconds: float) -> float:
        """The part of a collective of ``comm_seconds`` that ``compute_seconds`` beside it hides
        (``cost_models.hidden_seconds`` at the profile's slowdown); 0 without ``overlap``."""
        if not self.overlap:
            return 0.0
        return hidden_seconds(comm_seconds, compute_seconds, slowdown=self.profile.overlap_slowdown)

    def weight_grad_credit_seconds(self, node: NodeSpace, strategy: MeshStrategy, sync_seconds: float, n_readers: int) -> float:
        """The solver's credit to a gradient sync of ``sync_seconds`` for one of its ``n_readers``
        linears, ``node`` under ``strategy``, whose weight gradient runs beside it
        (``autotp.comm.overlap``): ``min(C_wgrad, T / ((1 + s) · k))``.

        The credits of the k readers sum to at most ``T / (1 + s)``, the most that can hide; the
        sum is exact for one reader and, as ``min`` of a sum is at least the sum of ``min``s of
        equal shares, a lower bound of the hidden time for several. Linear in the choice, so the
        ILP takes it as a coefficient of ``x[node, strategy]``. 0 without ``overlap``.
        """
        if not self.overlap or n_readers < 1:
            return 0.0
        share = sync_seconds / ((1.0 + self.profile.overlap_slowdown) * n_readers)
        return min(self.forward_kernel_seconds(node, strategy), share)

    def internal_comm_seconds(self, node: NodeSpace, strategy: MeshStrategy) -> float:
        """Collectives an op's local implementation runs inside (e.g. vocab-parallel softmax)."""
        if not node.internal_comm:
            return 0.0
        comm = node.internal_comm[node.strategies.index(strategy)]
        return sum(
            collective_seconds(self.axis_link(axis), kind, nbytes=nbytes, group_size=self.mesh.shape[axis]) for kind, nbytes, axis in comm
        )

    def axis_meta(self, meta: TensorMeta, placements: Placements, axis: int) -> TensorMeta:
        """``meta`` as a step on ``axis`` sees it: split by every *other* axis that shards it."""
        return split_meta(meta, placements, self.mesh.shape, (a for a in range(self.mesh.ndim) if a != axis))

    def step_seconds(self, step: Step, meta: TensorMeta) -> float:
        """Seconds of one step on a tensor of ``meta`` (as its axis sees it, ``axis_meta``): only its
        kind, axis and the tensor's bytes matter."""
        key = (step.kind, meta.nbytes, step.axis)
        seconds = self._step_seconds.get(key)
        if seconds is None:
            seconds = self._step_seconds[key] = self._price_step(step, meta.nbytes)
        return seconds

    def priced_seconds(self, steps: tuple[PricedStep, ...], meta: TensorMeta) -> float:
        """Seconds of ``steps`` (each with the placements it sees) on a value of global ``meta``."""
        return sum(self.step_seconds(step, self.axis_meta(meta, placements, step.axis)) for step, placements in steps)

    def priced_bytes_per_rank(self, steps: tuple[PricedStep, ...], meta: TensorMeta) -> float:
        return sum(self.step_bytes_per_rank(step, self.axis_meta(meta, placements, step.axis)) for step, placements in steps)

    def _price_step(self, step: Step, nbytes: int) -> float:
        group_size = self.mesh.shape[step.axis]
        if step.kind is StepKind.LOCAL_CHUNK:  # copy out this rank's chunk
            return roofline_seconds(self.profile, flops=0, nbytes=2 * nbytes / group_size)
        if step.kind is StepKind.TO_PARTIAL:  # zeros on all ranks but one
            return roofline_seconds(self.profile, flops=0, nbytes=nbytes)
        seconds = collective_seconds(self.axis_link(step.axis), _STEP_COLLECTIVE[step.kind], nbytes=nbytes, group_size=group_size)
        if self.assumed_gap_seconds is not None and seconds > 0:
            seconds += self.wake_seconds(step, self.assumed_gap_seconds)
        return seconds

    def axis_link(self, axis: int) -> LinkProfile:
        """The link the groups of mesh axis ``axis`` talk over (``autotp.ir.mesh`` says how it is decided)."""
        if self.mesh.inter_node_axes is not None:
            spans = axis in self.mesh.inter_node_axes
            return self.profile.inter_node if spans and self.profile.inter_node is not None else self.profile.intra_node
        return self.profile.link_for_axis(self.mesh.shape, axis)

    @property
    def prices_wake(self) -> bool:
        """Whether some axis's link charges collectives a wake-up after long compute (``autotp.cost.wake``)."""
        return any(
            size > 1 and any(self.axis_link(a).for_group(size).wake_curve(kind) is not None for kind in Collective)
            for a, size in enumerate(self.mesh.shape)
        )

    def wake_seconds(self, step: Step, gap_seconds: float) -> float:
        """A collective step's wake-up after ``gap_seconds`` of compute (0 up to calibration's gap)."""
        size = self.mesh.shape[step.axis]
        return wake_seconds(self.axis_link(step.axis), _STEP_COLLECTIVE[step.kind], gap_seconds=gap_seconds, group_size=size)

    def wake_curve(self, step: Step) -> WakeCurve | None:
        """The wake curve of a collective step's collective on its axis's link (None: it pays none)."""
        return self.axis_link(step.axis).for_group(self.mesh.shape[step.axis]).wake_curve(_STEP_COLLECTIVE[step.kind])

    def step_bytes_per_rank(self, step: Step, meta: TensorMeta) -> float:
        if not step.kind.is_collective:
            return 0.0
        kind = _STEP_COLLECTIVE[step.kind]
        size = self.mesh.shape[step.axis]
        algorithm = select_algorithm(self.axis_link(step.axis), kind, nbytes=meta.nbytes, group_size=size)
        return bytes_moved_per_rank(kind, nbytes=meta.nbytes, group_size=size, algorithm=algorithm)

    def transition_steps(self, src: Placements, dst: Placements, *, requires_grad: bool = False) -> tuple[PricedStep, ...] | None:
        """The priced steps converting ``src`` to ``dst``: forward, and the conjugates when training
        a value that needs a gradient; ``None`` when the table does not offer the change."""
        steps = transition(src, dst)
        if steps is None:
            return None
        before = step_placements(src, steps)
        priced = list(zip(steps, before))
        if self.training and requires_grad:
            priced += [(b, p) for s, p in zip(steps, before) for b in backward_steps(s)]
        return tuple(priced)

    def transition_seconds(self, src: Placements, dst: Placements, meta: TensorMeta, *, requires_grad: bool = False) -> float | None:
        """Seconds to convert ``src`` to ``dst``, or ``None`` when the table does not offer it."""
        steps = self.transition_steps(src, dst, requires_grad=requires_grad)
        return None if steps is None else self.priced_seconds(steps, meta)

    def grad_sync_seconds(self, meta: TensorMeta, placements: Placements, axes: tuple[int, ...], *, requires_grad: bool) -> float:
        """Backward all-reduce over ``axes`` of the partial gradient of a value read as ``placements``."""
        if not (self.training and requires_grad):
            return 0.0
        return self.priced_seconds(tuple((grad_sync_step(a), placements) for a in axes), meta)

    def state_nbytes(self, meta: TensorMeta, placements: Placements, *, is_parameter: bool) -> float:
        """Bytes one rank holds for a parameter/buffer placed as ``placements``."""
        share = split_count(placements, self.mesh.shape)
        return state_nbytes(
            param_nbytes=meta.nbytes / share, numel=meta.numel / share,
            training=self.training and is_parameter, optimizer=self.optimizer,
        )


def resolve_hardware(hardware: str | HardwareProfile) -> HardwareProfile:
    if isinstance(hardware, HardwareProfile):
        return hardware
    try:
        return load_profile(hardware)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from exc
