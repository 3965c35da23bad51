"""Activation memory of a plan: the bytes of the largest set of values alive at once on one rank.

A liveness walk over the plan's nodes in graph (topological) order, which is the order the
rank-local graph runs them in:

* every op, user input and inserted conversion makes a value of its rank-local size (the
  global size over the product of the sizes of the mesh axes that split it, ``S(d)``; the whole
  size on the axes where it is ``R`` or ``P``);
* a view (``view``, ``transpose``, ``getitem`` ...) makes no new bytes; it keeps the value it
  views alive as long as the view is read;
* a value dies after its last reader; the graph output's values live to the end;
* parameters and buffers are not activations (``Plan.memory_nbytes_per_device`` counts them).

``cost_models.peak_live_nbytes`` does the sweep. For inference this is the forward pass's
peak. For a training plan every floating-point op output is kept to the end of the forward,
since autograd saves what the backward reads: an upper estimate of what the backward needs
(some ops save only their inputs), and it ignores the backward's own temporaries.
Collectives' internal buffers and the allocator's fragmentation are not counted.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

from cost_models import peak_live_nbytes
from autotp.ir.placement import Placements, Shard
from autotp.ir.strategy import NodeKind
from autotp.ir.values import ValueRef, output_metas
from autotp.strategies.rules import lookup

if TYPE_CHECKING:
    from autotp.ir.plan import NodePlan, Plan

@functools.cache
def is_alias(op: str) -> bool:
    """Whether ``op`` (as a plan names it: ``"aten.view.default"``, ``"getitem"``) returns a view."""
    if op == "getitem":
        return True
    parts = op.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        return False
    packet = getattr(torch.ops.aten, parts[1], None)
    target = getattr(packet, parts[2], None) if packet is not None else None
    rule = lookup(target) if target is not None else None
    return bool(rule is not None and rule.view)


def _local(nbytes: int, placements: Placements, mesh_shape: tuple[int, ...]) -> float:
    """Bytes one rank holds of a value of ``nbytes`` placed as ``placements``."""
    share = math.prod(size for p, size in zip(placements, mesh_shape) if isinstance(p, Shard))
    return nbytes / share if share > 1 else float(nbytes)


def _outputs(node: NodePlan) -> tuple[Placements, ...]:
    return node.strategy.outputs


# A value the walk tracks: a node's output, or that output converted to placements for its readers.
_Key = ValueRef | tuple[ValueRef, Placements]


def activation_nbytes(plan: Plan) -> float:
    """Peak bytes of simultaneously live activations on one rank under ``plan``."""
    mesh_shape = tuple(plan.mesh_shape)
    index = {n.name: k for k, n in enumerate(plan.nodes)}
    end = len(plan.nodes)
    root: dict[_Key, _Key] = {}  # value -> the value whose bytes it is
    born: dict[_Key, int] = {}
    nbytes: dict[_Key, float] = {}
    last: dict[_Key, int] = {}
    kept: set[_Key] = set()

    def read(key: _Key, step: int) -> None:
        owner = root.get(key, key)
        last[owner] = max(last.get(owner, step), step)

    for step, node in enumerate(plan.nodes):
        if node.kind is NodeKind.STATE:
            continue
        for conversion in node.conversions:
            if conversion.backward_only:
                continue
            key: _Key = (conversion.value, conversion.dst)
            born[key], nbytes[key] = step, _local(conversion.nbytes, conversion.dst, mesh_shape)
        for ref, wanted in zip(node.inputs, node.strategy.inputs):
            if plan.nodes[index[ref.node]].kind is NodeKind.STATE:
                continue
            read_key: _Key = (ref, wanted) if (ref, wanted) in born else ref
            read(read_key, end if node.kind is NodeKind.OUTPUT else step)
        if node.kind is NodeKind.OUTPUT:
            continue
        metas = output_metas(node.output_meta)
        refs = [ValueRef(node.name, k) if isinstance(node.output_meta, tuple) else ValueRef(node.name) for k in range(len(metas))]
        if node.kind is NodeKind.OP and is_alias(node.op) and node.inputs:
            base = node.inputs[0]
            root[ValueRef(node.name)] = root.get(base, base)
            for ref in refs:
                root[ref] = root[ValueRef(node.name)]
            continue
        for ref, meta, placement in zip(refs, metas, _outputs(node)):
            born[ref], nbytes[ref] = step, _local(meta.nbytes, placement, mesh_shape)
            if plan.training and meta.dtype.is_floating_point and node.kind is NodeKind.OP:
                kept.add(ref)
    intervals = []
    for key, first in born.items():
        final = end if key in kept else last.get(key, first)
        intervals.append((first, max(first, final), nbytes[key]))
    return peak_live_nbytes(intervals)
