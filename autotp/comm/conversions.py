"""The one decision: which conversions and gradient syncs a chosen plan runs, and where.

Given the strategy space and the strategy chosen per node, ``conversion_sites`` lists, in graph
order, every place a value changes placement before a consumer reads it and every gradient
all-reduce. The plan (``autotp.plan``), the rewriter, the schedule (``autotp.cost.wake``) and the
symbolic costs read this list; the solver prices the same rule slot by slot
(``needs_grad_sync``, ``backward_conjugates``). So what is priced is what runs.

Rules:

* one conversion per (value, target placement), placed at its first consumer and shared by
  all later ones, with the steps of ``redistribute.transition``;
* one gradient sync per (value, placements read, axes), at the first slot that reads it as ``R``
  on those mesh axes into work split over them (``grad_sync_axes``): that slot's gradient is a
  partial sum over each such axis (Megatron-LM's ``f``; over a data-parallel axis, the gradient
  all-reduce of data parallelism);
* backward runs a conversion's conjugate steps (``redistribute.backward_steps``) and each
  sync's all-reduce whenever a gradient reaches them. They are *priced* only when the plan is
  for training and the value needs a gradient in the planned model; otherwise they are listed
  with no price: they run only if the caller passes inputs with ``requires_grad`` or runs a
  backward through an inference plan.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from autotp.comm.redistribute import Step, backward_steps, grad_sync_step, step_placements, transition
from autotp.ir.placement import Placements, Replicate
from autotp.ir.strategy import MeshStrategy
from autotp.ir.values import TensorMeta, ValueRef
from autotp.strategies.engine import StrategySpace

SlotKey = tuple[str, int]  # (consumer node name, input slot)
PricedStep = tuple[Step, Placements]  # a step and the placements of the tensor when it runs


@dataclass(frozen=True, slots=True)
class ConversionSite:
    """Value ``value`` converted from ``src`` to ``dst`` before ``readers`` (the first one emits it)."""

    value: ValueRef
    src: Placements
    dst: Placements
    forward: tuple[Step, ...]
    conjugate: tuple[Step, ...]  # what backward runs when a gradient reaches it
    priced_backward: bool  # training plan and the value needs a gradient in the planned model
    readers: tuple[SlotKey, ...]

    @property
    def consumer(self) -> str:
        return self.readers[0][0]

    @property
    def backward(self) -> tuple[Step, ...]:
        """The backward steps the plan prices (the conjugate, when a gradient is expected)."""
        return self.conjugate if self.priced_backward else ()

    @property
    def priced_steps(self) -> tuple[PricedStep, ...]:
        """The steps the cost model charges, each with the placements it sees: forward, then the
        priced backward (a conjugate moves the same tensor its forward step did)."""
        before = step_placements(self.src, self.forward)
        steps = list(zip(self.forward, before))
        if self.priced_backward:
            steps += [(b, p) for s, p in zip(self.forward, before) for b in backward_steps(s)]
        return tuple(steps)


@dataclass(frozen=True, slots=True)
class GradSyncSite:
    """Backward all-reduce over ``axes`` of ``value``'s gradient, read as ``placements`` (``R`` on
    those axes) by work split over them at ``readers``."""

    value: ValueRef
    placements: Placements
    axes: tuple[int, ...]
    priced_backward: bool
    readers: tuple[SlotKey, ...]

    @property
    def consumer(self) -> str:
        return self.readers[0][0]

    @property
    def forward(self) -> tuple[Step, ...]:
        return ()

    @property
    def conjugate(self) -> tuple[Step, ...]:
        return tuple(grad_sync_step(axis) for axis in self.axes)

    @property
    def backward(self) -> tuple[Step, ...]:
        return self.conjugate if self.priced_backward else ()

    @property
    def priced_steps(self) -> tuple[PricedStep, ...]:
        return tuple((step, self.placements) for step in self.backward)


Site = ConversionSite | GradSyncSite


def grad_sync_axes(strategy: MeshStrategy, slot: int, meta: TensorMeta) -> tuple[int, ...]:
    """The mesh axes over which input ``slot`` under ``strategy`` needs its gradient all-reduced in
    backward: those where a floating value is read whole (``R``) by work each rank of the axis
    does only part of."""
    if not meta.dtype.is_floating_point:
        return ()
    placements = strategy.inputs[slot]
    return tuple(a for a, p in enumerate(placements) if isinstance(p, Replicate) and strategy.divides_output(a))


def needs_grad_sync(strategy: MeshStrategy, slot: int, meta: TensorMeta) -> bool:
    """Whether input ``slot`` needs a gradient all-reduce over any axis (``grad_sync_axes``)."""
    return bool(grad_sync_axes(strategy, slot, meta))


def conversion_sites(space: StrategySpace, chosen: Mapping[str, MeshStrategy], *, training: bool) -> tuple[Site, ...]:
    """Every conversion and gradient sync of the plan that picks ``chosen[node]`` per node, in graph order."""
    nodes = space.by_name()
    # readers are collected as the walk meets them; each site is completed with them at the end
    conversions: dict[tuple[ValueRef, Placements], tuple[ConversionSite, list[SlotKey]]] = {}
    syncs: dict[tuple[ValueRef, Placements, tuple[int, ...]], tuple[GradSyncSite, list[SlotKey]]] = {}
    order: list[tuple] = []
    for node in space.nodes:
        strategy = chosen[node.name]
        for slot, (ref, dst) in enumerate(zip(node.slots, strategy.inputs)):
            producer = nodes[ref.node]
            src = producer.output_placement(chosen[ref.node], ref.index)
            priced = training and producer.requires_grad
            if src != dst:
                key = (ref, dst)
                if key not in conversions:
                    steps = transition(src, dst)
                    if steps is None:
                        raise AssertionError(f"the plan requires {src} -> {dst} on {ref}, which the transition table does not offer")
                    conversions[key] = (ConversionSite(ref, src, dst, steps, backward_conjugates(steps), priced, ()), [])
                    order.append(key)
                conversions[key][1].append((node.name, slot))
            axes = grad_sync_axes(strategy, slot, producer.output_value_meta(ref.index))
            if axes:
                sync_key = (ref, dst, axes)
                if sync_key not in syncs:
                    syncs[sync_key] = (GradSyncSite(ref, dst, axes, priced, ()), [])
                    order.append(sync_key)
                syncs[sync_key][1].append((node.name, slot))
    return tuple(
        replace(syncs[key][0], readers=tuple(syncs[key][1])) if len(key) == 3
        else replace(conversions[key][0], readers=tuple(conversions[key][1]))
        for key in order
    )


def backward_conjugates(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """The backward steps of a forward conversion, in the order the forward ran them."""
    return tuple(b for s in steps for b in backward_steps(s))


def sites_by_consumer(sites: tuple[Site, ...]) -> dict[str, list[Site]]:
    """``sites`` grouped by the node that emits them, in order: the plan's conversions per node."""
    grouped: dict[str, list[Site]] = {}
    for site in sites:
        grouped.setdefault(site.consumer, []).append(site)
    return grouped
