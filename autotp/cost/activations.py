"""Activation memory of a plan: the bytes of the largest set of values alive at once on one rank.

A liveness walk over the plan's nodes in graph (topological) order, which is the order the
rank-local graph runs them in:

* every op, user input and inserted conversion makes a value of its rank-local size (the
  global size over tp for ``S(d)``, the whole size for ``R`` and ``P``);
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
import re
from typing import TYPE_CHECKING

import torch

from cost_models import peak_live_nbytes
from autotp.ir.placement import Placement, Shard
from autotp.strategies.engine import NodeKind
from autotp.strategies.rules import lookup

if TYPE_CHECKING:
    from autotp.ir.plan import NodePlan, Plan

_VALUE = re.compile(r"(\w+)\[([0-9,]*)\]")


def _sizes(value: str) -> list[tuple[int, bool]]:
    """``"float32[8,16]"`` -> ``[(512, True)]``: bytes and is-floating of each output."""
    out = []
    for dtype_name, dims in _VALUE.findall(value):
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            continue
        numel = 1
        for d in filter(None, dims.split(",")):
            numel *= int(d)
        out.append((numel * dtype.itemsize, dtype.is_floating_point))
    return out


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


def _local(nbytes: int, placement: Placement, tp_size: int) -> float:
    return nbytes / tp_size if isinstance(placement, Shard) else float(nbytes)


def _outputs(node: NodePlan) -> tuple[Placement, ...]:
    out = node.strategy.output
    return out if isinstance(out, tuple) else (out,)


def activation_nbytes(plan: Plan) -> float:
    """Peak bytes of simultaneously live activations on one rank under ``plan``."""
    tp = plan.tp_size
    index = {n.name: k for k, n in enumerate(plan.nodes)}
    end = len(plan.nodes)
    root: dict[str, str] = {}  # value key -> the key of the value whose bytes it is
    born: dict[str, int] = {}
    nbytes: dict[str, float] = {}
    last: dict[str, int] = {}
    kept: set[str] = set()

    def read(key: str, step: int) -> None:
        owner = root.get(key, key)
        last[owner] = max(last.get(owner, step), step)

    for step, node in enumerate(plan.nodes):
        if node.kind is NodeKind.STATE:
            continue
        placements = list(zip(node.inputs, node.strategy.inputs))
        for conversion in node.conversions:
            if conversion.backward_only:
                continue
            key = f"{conversion.value}->{conversion.dst}"
            born[key], nbytes[key] = step, _local(conversion.nbytes, conversion.dst, tp)
        for ref, wanted in placements:
            producer = plan.nodes[index[ref.partition("[")[0]]]
            if producer.kind is NodeKind.STATE:
                continue
            converted = f"{ref}->{wanted}"
            read(converted if converted in born else ref, step)
            if node.kind is NodeKind.OUTPUT:
                read(converted if converted in born else ref, end)
        if node.kind is NodeKind.OUTPUT:
            continue
        sizes = _sizes(node.value)
        if node.kind is NodeKind.OP and is_alias(node.op) and node.inputs:
            base = node.inputs[0]
            root[node.name] = root.get(base, base)
            for k in range(len(sizes)):
                root[f"{node.name}[{k}]"] = root[node.name]
            continue
        for k, ((size, floating), placement) in enumerate(zip(sizes, _outputs(node))):
            key = f"{node.name}[{k}]" if node.value.startswith("(") else node.name
            born[key], nbytes[key] = step, _local(size, placement, tp)
            if plan.training and floating and node.kind is NodeKind.OP:
                kept.add(key)
    intervals = []
    for key, first in born.items():
        final = end if key in kept else last.get(key, first)
        intervals.append((first, max(first, final), nbytes[key]))
    return peak_live_nbytes(intervals)
