"""The one decision of which communication runs beside which compute (``overlap=True``).

The rewriter schedules the rank-local graph by it, the ILP and the plan price it
(``cost_models.exposed_seconds``), and the report shows it. Two kinds of overlap:

* **forward**: a conversion whose first step is a collective of ``ASYNC_STEP_KINDS`` starts
  as early as its value is ready and waits just before its first reader; the nodes in between
  run while it communicates. So that one collective at a time is in flight (gloo and NCCL run a
  group's collectives in issue order anyway, and an early all-gather of every weight would hold
  all of them), a start also waits for the collective before it: it goes right after the later
  of its value's producer and the previous collective's wait. In node positions (the order of
  ``StrategySpace.nodes``, which the rewriter emits), conversion ``k`` with producer ``p`` and
  first reader ``c``, after a collective conversion whose first reader is ``c'``, runs beside the
  nodes ``n`` with ``max(pos(p) + 1, pos(c')) <= pos(n) < pos(c)`` (none when ``c' == c``).
* **backward**: the gradient all-reduce of an ``R`` input read by column-parallel linears
  (Megatron-LM's ``f``) starts as soon as the input's gradient is summed and waits after the
  linears' weight gradients (``grad W = g^T x``), which do not need it. The readers run as one
  node (``collectives.linears_with_grad_sync``) at the first reader, so this holds only when
  every reader is a contraction of ``FUSED_CONTRACTIONS`` (``aten.linear``, the ``addmm`` of
  Hugging Face's ``Conv1D``, ``mm``, ``matmul`` by a matrix) reading the value as its input,
  with a weight that needs a gradient, and every other input of every reader is ready before the
  first reader without a collective (otherwise moving the readers would move communication).

The conjugates of forward collectives and syncs over several mesh axes stay blocking.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from autotp.comm.conversions import ConversionSite, GradSyncSite, Site, SlotKey
from autotp.ir.steps import StepKind
from autotp.strategies.engine import NodeSpace, StrategySpace

# Collectives the rewriter can start and wait for separately (all-to-all concatenates what
# arrives, which must wait; it stays blocking).
ASYNC_STEP_KINDS = frozenset({StepKind.ALL_REDUCE, StepKind.ALL_GATHER, StepKind.REDUCE_SCATTER})



@dataclass(frozen=True, slots=True)
class FusedContraction:
    """A contraction whose readers of one input can run as one node: its kind for
    ``collectives.linears_with_grad_sync`` and the slots of its input and weight."""

    kind: str
    input_slot: int
    weight_slot: int


FUSED_CONTRACTIONS: Mapping[str, FusedContraction] = {
    "aten.linear.default": FusedContraction("linear", 0, 1),  # x @ W.T + b
    "aten.addmm.default": FusedContraction("addmm", 1, 2),  # beta·b + alpha·(x @ W), x (N, in)
    "aten.mm.default": FusedContraction("mm", 0, 1),  # x @ W
    "aten.matmul.default": FusedContraction("matmul", 0, 1),  # x @ W, W a matrix (checked)
}


@dataclass(frozen=True, slots=True)
class OverlapSchedule:
    """Which sites of a plan overlap which nodes; empty when overlap is off.

    ``forward[site]``: the nodes (by name, in order) that run while the site's first step
    communicates. ``weight_grads[site]``: the linears (by name, in order) whose weight gradients
    run while the gradient sync communicates; they run as one node at the first of them.
    """

    forward: Mapping[ConversionSite, tuple[str, ...]] = field(default_factory=dict)
    weight_grads: Mapping[GradSyncSite, tuple[str, ...]] = field(default_factory=dict)

    def hoisted(self, site: Site) -> bool:
        """Whether the rewriter starts the site's first step early (it may have no compute beside it)."""
        return site in self.forward


NO_OVERLAP = OverlapSchedule()


def overlap_schedule(space: StrategySpace, sites: Sequence[Site], *, overlap: bool = True) -> OverlapSchedule:
    """The overlap of the plan whose conversions are ``sites`` (``conversion_sites``, in graph order)."""
    if not overlap:
        return NO_OVERLAP
    nodes = space.by_name()
    position = {n.name: i for i, n in enumerate(space.nodes)}
    forward: dict[ConversionSite, tuple[str, ...]] = {}
    previous_reader: int | None = None  # first reader of the last conversion that communicates
    for site in sites:
        if not isinstance(site, ConversionSite) or not any(s.kind.is_collective for s in site.forward):
            continue
        reader = position[site.consumer]
        if site.forward[0].kind in ASYNC_STEP_KINDS:
            start = position[site.value.node] + 1
            if previous_reader is not None:
                start = max(start, previous_reader) if previous_reader != reader else reader
            forward[site] = tuple(space.nodes[i].name for i in range(start, reader))
        previous_reader = reader
    communicating: set[SlotKey] = {
        reader for s in sites if isinstance(s, ConversionSite) and any(step.kind.is_collective for step in s.forward) for reader in s.readers
    }
    weight_grads = {
        site: readers for site in sites
        if isinstance(site, GradSyncSite) and (readers := fused_linear_readers(nodes, position, communicating, site))
    }
    return OverlapSchedule(forward, weight_grads)


def fused_linear_readers(
    nodes: Mapping[str, NodeSpace], position: Mapping[str, int], communicating: set[SlotKey], site: GradSyncSite,
) -> tuple[str, ...]:
    """The readers of ``site`` that run as one linear node with an asynchronous gradient sync, or
    ``()`` when the conditions of the module docstring do not hold (``position``: each node's
    index in graph order; ``communicating``: the slots some collective conversion feeds)."""
    if len(site.axes) != 1 or not linears_read_input(nodes, site.value.node, site.value.index, site.readers):
        return ()
    first = min(position[name] for name, _ in site.readers)
    for name, input_slot in site.readers:
        for slot, ref in enumerate(nodes[name].slots):
            if slot != input_slot and (position[ref.node] >= first or (name, slot) in communicating):
                return ()
    return tuple(sorted({name for name, _ in site.readers}, key=position.__getitem__))


def linears_read_input(nodes: Mapping[str, NodeSpace], node: str, index: int | None, readers: Sequence[SlotKey]) -> bool:
    """Whether every reader in ``readers`` is a contraction reading value ``(node, index)`` as its
    input (``reads_as_input``) with a weight that needs a gradient: the static half of
    ``fused_linear_readers``, which the ILP checks over all the value's readers (``nodes``: the
    space's nodes by name)."""
    for name, slot in readers:
        reader = nodes[name]
        if not reads_as_input(reader, slot):
            return False
        weight = reader.slots[FUSED_CONTRACTIONS[reader.op].weight_slot]
        if (weight.node, weight.index) == (node, index) or not nodes[weight.node].requires_grad:
            return False
    return bool(readers)


def reads_as_input(reader: NodeSpace, slot: int) -> bool:
    """Whether ``reader`` is a contraction of ``FUSED_CONTRACTIONS`` and ``slot`` its input (not
    its weight or bias), with a matrix weight (``matmul`` by a batch of matrices does not fuse)."""
    contraction = FUSED_CONTRACTIONS.get(reader.op)
    if contraction is None or slot != contraction.input_slot or len(reader.slots) <= contraction.weight_slot:
        return False
    return len(reader.slot_metas[contraction.weight_slot].shape) == 2 and len(reader.slot_metas[slot].shape) >= 1

