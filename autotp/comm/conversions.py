"""The one decision: which conversions and gradient syncs a chosen plan runs, and where.

Given the strategy space and the strategy chosen per node, ``conversion_sites`` lists, in graph
order, every place a value changes placement before a consumer reads it and every gradient
all-reduce. The plan (``autotp.plan``), the rewriter, the schedule (``autotp.cost.wake``) and the
symbolic costs read this list; the solver prices the same rule slot by slot
(``needs_grad_sync``, ``backward_conjugates``). So what is priced is what runs.

Rules:

* one conversion per (value, target placement), placed at its first consumer and shared by
  all later ones, with the steps of ``redistribute.transition``;
* one gradient sync per value, at the first slot that reads it as ``R`` into work split across
  ranks (``needs_grad_sync``): that slot's gradient is a partial sum (Megatron-LM's ``f``);
* backward runs a conversion's conjugate steps (``redistribute.backward_steps``) and each
  sync's all-reduce whenever a gradient reaches them. They are *priced* only when the plan is
  for training and the value needs a gradient in the planned model; otherwise they are listed
  with no price: they run only if the caller passes inputs with ``requires_grad`` or runs a
  backward through an inference plan.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from autotp.comm.redistribute import GRAD_SYNC, Step, backward_steps, transition
from autotp.ir.placement import Placement, Replicate
from autotp.ir.values import TensorMeta, ValueRef
from autotp.strategies.engine import StrategySpace
from autotp.strategies.rules import OpStrategy

SlotKey = tuple[str, int]  # (consumer node name, input slot)


@dataclass(frozen=True, slots=True)
class ConversionSite:
    """Value ``value`` converted from ``src`` to ``dst`` before ``readers`` (the first one emits it)."""

    value: ValueRef
    src: Placement
    dst: Placement
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
    def priced_steps(self) -> tuple[Step, ...]:
        """The steps the cost model charges: forward, then the priced backward."""
        return self.forward + self.backward


@dataclass(frozen=True, slots=True)
class GradSyncSite:
    """Backward all-reduce of ``value``'s gradient, read as ``R`` by split work at ``readers``."""

    value: ValueRef
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
        return (GRAD_SYNC,)

    @property
    def backward(self) -> tuple[Step, ...]:
        return self.conjugate if self.priced_backward else ()

    @property
    def priced_steps(self) -> tuple[Step, ...]:
        return self.backward


Site = ConversionSite | GradSyncSite


def needs_grad_sync(strategy: OpStrategy, slot: int, meta: TensorMeta) -> bool:
    """Whether input ``slot`` under ``strategy`` needs its gradient all-reduced in backward:
    a floating value read whole (``R``) by work each rank does only part of."""
    return isinstance(strategy.inputs[slot], Replicate) and strategy.divides_output() and meta.dtype.is_floating_point


def backward_conjugates(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """The backward steps of a forward conversion, in the order the forward ran them."""
    return tuple(b for s in steps for b in backward_steps(s))


def conversion_sites(space: StrategySpace, chosen: Mapping[str, OpStrategy], *, training: bool) -> tuple[Site, ...]:
    """Every conversion and gradient sync of the plan that picks ``chosen[node]`` per node, in graph order."""
    nodes = space.by_name()
    # readers are collected as the walk meets them; each site is completed with them at the end
    conversions: dict[tuple[ValueRef, Placement], tuple[ConversionSite, list[SlotKey]]] = {}
    syncs: dict[ValueRef, tuple[GradSyncSite, list[SlotKey]]] = {}
    order: list[tuple[ValueRef, Placement] | ValueRef] = []
    for node in space.nodes:
        strategy = chosen[node.name]
        for slot, (ref, dst) in enumerate(zip(node.slots, strategy.inputs)):
            producer = nodes[ref.node]
            src = producer.output_placement(chosen[ref.node], ref.index)
            priced = training and producer.requires_grad
            if src != dst:
                if (ref, dst) not in conversions:
                    steps = transition(src, dst)
                    if steps is None:
                        raise AssertionError(f"the plan requires {src} -> {dst} on {ref}, which the transition table does not offer")
                    conversions[(ref, dst)] = (ConversionSite(ref, src, dst, steps, backward_conjugates(steps), priced, ()), [])
                    order.append((ref, dst))
                conversions[(ref, dst)][1].append((node.name, slot))
            if needs_grad_sync(strategy, slot, producer.output_value_meta(ref.index)):
                if ref not in syncs:
                    syncs[ref] = (GradSyncSite(ref, priced, ()), [])
                    order.append(ref)
                syncs[ref][1].append((node.name, slot))
    return tuple(
        replace(syncs[key][0], readers=tuple(syncs[key][1])) if isinstance(key, ValueRef)
        else replace(conversions[key][0], readers=tuple(conversions[key][1]))
        for key in order
    )


def sites_by_consumer(sites: tuple[Site, ...]) -> dict[str, list[Site]]:
    """``sites`` grouped by the node that emits them, in order: the plan's conversions per node."""
    grouped: dict[str, list[Site]] = {}
    for site in sites:
        grouped.setdefault(site.consumer, []).append(site)
    return grouped
