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
    load_profile,
    matmul_seconds,
    op_seconds,
    roofline_seconds,
    select_algorithm,
    state_nbytes,
    wake_seconds,
)
from autotp.comm.conversions import backward_conjugates
from autotp.comm.redistribute import GRAD_SYNC, Step, StepKind, transition
from autotp.errors import ConfigError
from autotp.ir.placement import Placement, Shard
from autotp.ir.values import TensorMeta
from autotp.strategies.engine import NodeKind, NodeSpace
from autotp.strategies.op_facts import CONTRACTION_OPS, SECOND_MATRIX_SLOT, op_class_of, packet_name
from autotp.strategies.rules import OpStrategy

aten = torch.ops.aten

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def node_flops(node: NodeSpace) -> float:
    """Global FLOPs of one op: 2·M·N·K for contractions, 4·B·H·Tq·Tk·D for attention, else numel."""
    packet = packet_name(node.op)
    out = node.output_meta
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


def weight_share(node: NodeSpace, strategy: OpStrategy, tp_size: int) -> int:
    """How many ranks split a contraction's weight under ``strategy`` (1: each holds all of it)."""
    slot = _weight_slot(node)
    return tp_size if slot is not None and isinstance(strategy.inputs[slot], Shard) else 1


def node_nbytes(node: NodeSpace) -> float:
    out = node.output_meta
    outs = out if isinstance(out, tuple) else (out,) if out is not None else ()
    return float(sum(m.nbytes for m in node.slot_metas) + sum(m.nbytes for m in outs))


def splits_work(strategy: OpStrategy) -> bool:
    return any(isinstance(p, Shard) for p in (*strategy.inputs, *strategy.outputs()))


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
    """Seconds of each (node, strategy) and each placement transition on one mesh axis.

    With ``training`` the prices cover forward and backward: compute ×(1 + 2), each conversion
    plus its conjugate (``redistribute.backward_steps``) when the value needs a gradient, and
    the gradient all-reduce of ``R`` inputs to split compute. Memory counts gradients and
    ``optimizer`` state per parameter element. ``assumed_gap_seconds`` lets the solver see the
    wake-up (``autotp.cost.wake``) at one gap for all collectives; a plan is priced without it, from
    its own schedule.
    """

    profile: HardwareProfile
    tp_size: int
    training: bool = False
    optimizer: str | None = None
    assumed_gap_seconds: float | None = None  # solver only: charge every collective the wake-up after this much compute
    # step_seconds by (step kind, bytes): a 70B graph prices a few sizes thousands of times. Not
    # an argument: ``dataclasses.replace`` (another gap) starts an empty one.
    _step_seconds: dict[tuple[StepKind, int], float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def compute_seconds(self, node: NodeSpace, strategy: OpStrategy) -> float:
        return self.kernel_seconds(node, strategy) + self.internal_comm_seconds(node, strategy)

    def kernel_seconds(self, node: NodeSpace, strategy: OpStrategy) -> float:
        """The op's own compute (forward, and backward when training), without the collectives it runs inside."""
        if node.kind is not NodeKind.OP:
            return 0.0
        if node.is_view:  # no kernel; a calibrated profile charges the dispatch
            forward = op_seconds(self.profile, flops=0.0, nbytes=0.0, op_class="view")
        else:
            share = self.tp_size if splits_work(strategy) else 1
            dtype = _dtype_name(node.slot_metas[0].dtype if node.slot_metas else torch.float32)
            flops, nbytes, kind = node_flops(node) / share, node_nbytes(node) / share, op_class(node)
            if kind is None:  # a contraction, which also fetches its weight
                weight = node_weight_nbytes(node) / weight_share(node, strategy, self.tp_size)
                forward = matmul_seconds(self.profile, flops=flops, nbytes=nbytes, weight_nbytes=weight, dtype=dtype)
            else:
                forward = op_seconds(self.profile, flops=flops, nbytes=nbytes, dtype=dtype, op_class=kind)
        return forward * (1 + BACKWARD_COMPUTE_FACTOR) if self.training and node.requires_grad else forward

    def internal_comm_seconds(self, node: NodeSpace, strategy: OpStrategy) -> float:
        """Collectives an op's local implementation runs inside (e.g. vocab-parallel softmax)."""
        if not node.internal_comm:
            return 0.0
        comm = node.internal_comm[node.strategies.index(strategy)]
        return sum(collective_seconds(self.link, kind, nbytes=nbytes, group_size=self.tp_size) for kind, nbytes in comm)

    def step_seconds(self, step: Step, meta: TensorMeta) -> float:
        """Seconds of one step on a tensor of ``meta``: only its kind and the tensor's bytes matter."""
        key = (step.kind, meta.nbytes)
        seconds = self._step_seconds.get(key)
        if seconds is None:
            seconds = self._step_seconds[key] = self._price_step(step, meta.nbytes)
        return seconds

    def _price_step(self, step: Step, nbytes: int) -> float:
        if step.kind is StepKind.LOCAL_CHUNK:  # copy out this rank's chunk
            return roofline_seconds(self.profile, flops=0, nbytes=2 * nbytes / self.tp_size)
        if step.kind is StepKind.TO_PARTIAL:  # zeros on all ranks but one
            return roofline_seconds(self.profile, flops=0, nbytes=nbytes)
        seconds = collective_seconds(self.link, _STEP_COLLECTIVE[step.kind], nbytes=nbytes, group_size=self.tp_size)
        if self.assumed_gap_seconds is not None and seconds > 0:
            seconds += self.wake_seconds(step, self.assumed_gap_seconds)
        return seconds

    @property
    def link(self) -> LinkProfile:
        """The link the mesh axis's groups talk over (intra-node unless tp spans nodes)."""
        return self.profile.link_for_group(self.tp_size)

    @property
    def prices_wake(self) -> bool:
        """Whether the link charges collectives a wake-up after long compute (``autotp.cost.wake``)."""
        link = self.link.for_group(self.tp_size)
        return self.tp_size > 1 and any(link.wake_curve(kind) is not None for kind in Collective)

    def wake_seconds(self, step: Step, gap_seconds: float) -> float:
        """A collective step's wake-up after ``gap_seconds`` of compute (0 up to calibration's gap)."""
        return wake_seconds(self.link, _STEP_COLLECTIVE[step.kind], gap_seconds=gap_seconds, group_size=self.tp_size)

    def wake_curve(self, step: Step) -> WakeCurve | None:
        """The wake curve of a collective step's collective on this link (None: it pays none)."""
        return self.link.for_group(self.tp_size).wake_curve(_STEP_COLLECTIVE[step.kind])

    def step_bytes_per_rank(self, step: Step, meta: TensorMeta) -> float:
        if not step.kind.is_collective:
            return 0.0
        kind = _STEP_COLLECTIVE[step.kind]
        algorithm = select_algorithm(self.link, kind, nbytes=meta.nbytes, group_size=self.tp_size)
        return bytes_moved_per_rank(kind, nbytes=meta.nbytes, group_size=self.tp_size, algorithm=algorithm)

    def steps_with_backward(self, steps: tuple[Step, ...], requires_grad: bool) -> tuple[Step, ...]:
        if not (self.training and requires_grad):
            return steps
        return steps + backward_conjugates(steps)

    def transition_seconds(self, src: Placement, dst: Placement, meta: TensorMeta, *, requires_grad: bool = False) -> float | None:
        """Seconds to convert ``src`` to ``dst``, or ``None`` when the table does not offer it."""
        steps = transition(src, dst)
        if steps is None:
            return None
        return sum(self.step_seconds(s, meta) for s in self.steps_with_backward(steps, requires_grad))

    def grad_sync_seconds(self, meta: TensorMeta, *, requires_grad: bool) -> float:
        """Backward all-reduce of the partial gradient of an ``R`` input to split compute."""
        return self.step_seconds(GRAD_SYNC, meta) if self.training and requires_grad else 0.0

    def state_nbytes(self, meta: TensorMeta, placement: Placement, *, is_parameter: bool) -> float:
        """Bytes one rank holds for a parameter/buffer placed as ``placement``."""
        share = self.tp_size if isinstance(placement, Shard) else 1
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
