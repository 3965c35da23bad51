"""Brute-force check of sharding rules in one process: shard, run per rank, reassemble, compare.

For one node of a captured graph and one of its strategies on ``tp_size`` ranks, every rank ``r``
gets its local inputs per placement::

    R     the whole tensor
    S(d)  chunk r of tensor.chunk(tp_size, d)
    P     a random summand (ranks 1.. draw noise, rank 0 holds the rest: the summands add up)

runs the op as the rewriter does (shape arguments localised when the output is split, then
called through the overload packet), and checks each rank's output against the unsharded one::

    R     every rank holds the whole result
    S(d)  rank r holds chunk r along d
    P     the outputs add up to the result

A rule that only lists correct strategies passes for every input; a wrong one fails on almost any
random input. Ops that draw random numbers or return uninitialised memory are checked for shape
and dtype only.

    values = node_values(captured, model, inputs)
    failures = check_graph(captured, values, tp_size=3)   # [] when every rule holds
"""
from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from autotp.capture import CapturedGraph, InputRole
from autotp.placement import Partial, Placement, Replicate, Shard
from autotp.rules.registry import LocalContext, OpStrategy, Rule, lookup
from autotp.strategies import NodeKind, NodeSpace, ValueRef, build_strategy_space, is_tensor_value

aten = torch.ops.aten

# float32 tolerances: a P summand adds rounding of the size of the tensor's own values.
ATOL = 1e-5
RTOL = 1e-4


@dataclass(frozen=True, slots=True)
class RuleFailure:
    """One strategy of one node that does not reproduce the unsharded result."""

    node: str
    op: str
    strategy: OpStrategy
    tp_size: int
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}) {self.strategy} on {self.tp_size} ranks: {self.reason}"


def node_values(captured: CapturedGraph, model: nn.Module, inputs: Sequence[Any]) -> dict[str, Any]:
    """The value of every node of ``captured`` when run on ``model``'s state and ``inputs``."""
    user_inputs = iter(pytree.tree_leaves(tuple(inputs)))
    flat: list[Any] = []
    for gi in captured.inputs:
        if gi.role is InputRole.USER_INPUT:
            flat.append(next(user_inputs))
        elif gi.role is InputRole.CONSTANT:
            flat.append(captured.constants[gi.node_name])
        else:
            owner, _, name = gi.fqns[0].rpartition(".")
            flat.append(getattr(model.get_submodule(owner) if owner else model, name))
    values: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n.name] = result = super().run_node(n)
            return result

    with torch.no_grad():
        _Recorder(captured.graph_module).run(*flat)
    return values


def check_graph(
    captured: CapturedGraph,
    values: Mapping[str, Any],
    *,
    tp_size: int,
    seed: int = 0,
    skip: frozenset[tuple[str, str]] = frozenset(),
) -> tuple[int, list[RuleFailure]]:
    """Check every strategy of every op node; ``skip`` holds ``(node, str(strategy))`` pairs.

    Returns the number of (node, strategy) cases checked and the failures among them.
    """
    space = build_strategy_space(captured, tp_size)
    nodes = {n.name: n for n in captured.graph_module.graph.nodes}
    generator = torch.Generator().manual_seed(seed)
    checked, failures = 0, []
    for ns in space.nodes:
        if ns.kind is not NodeKind.OP:
            continue
        for strategy in ns.strategies:
            if (ns.name, str(strategy)) in skip:
                continue
            checked += 1
            reason = check_strategy(nodes[ns.name], ns, strategy, values, tp_size=tp_size, generator=generator)
            if reason is not None:
                failures.append(RuleFailure(ns.name, ns.op, strategy, tp_size, reason))
    return checked, failures


def check_strategy(
    node: fx.Node,
    space: NodeSpace,
    strategy: OpStrategy,
    values: Mapping[str, Any],
    *,
    tp_size: int,
    generator: torch.Generator,
) -> str | None:
    """``None`` when ``strategy`` of ``node`` reproduces ``values[node.name]``, else what differs."""
    slot_values = [_value(values, ref) for ref in space.slots]
    for k, (value, placement) in enumerate(zip(slot_values, strategy.inputs)):
        if isinstance(placement, Partial) and not value.dtype.is_floating_point:
            return f"input {k} is {value.dtype} but placed P (only R or S make sense for integers)"
    expected = values[node.name]
    expected_outs = tuple(expected) if isinstance(expected, (tuple, list)) else (expected,)
    out_placements = strategy.output if isinstance(strategy.output, tuple) else (strategy.output,)
    for k, (value, placement) in enumerate(zip(expected_outs, out_placements)):
        if isinstance(placement, Partial) and not value.dtype.is_floating_point:
            return f"output {k} is {value.dtype} but placed P (only R or S make sense for integers)"
    local_inputs = [_split(v, p, tp_size, generator) for v, p in zip(slot_values, strategy.inputs)]
    rule = lookup(node.target)
    values_only = _is_deterministic(node)
    for rank in range(tp_size):
        inputs = [shards[rank] for shards in local_inputs]
        try:
            out = _run_local(node, rule, space, strategy, inputs, values, rank=rank, tp_size=tp_size)
        except Exception as exc:  # any error means the local op cannot run as the rule says
            return f"rank {rank} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(expected_outs):
            return f"rank {rank} returned {len(outs)} outputs, expected {len(expected_outs)}"
        for k, (got, want, placement) in enumerate(zip(outs, expected_outs, out_placements)):
            reason = _compare_local(got, want, placement, rank, tp_size, values_only)
            if reason is not None:
                return f"output {k} {placement} on rank {rank}: {reason}"
        for k in range(len(outs)):
            local_inputs_out = outs[k]
            if isinstance(out_placements[k], Partial):
                _partial_sums.setdefault(k, []).append(local_inputs_out)
    return _check_partial_sums(expected_outs, out_placements, values_only)


_partial_sums: dict[int, list[torch.Tensor]] = {}


def _check_partial_sums(expected: tuple[Any, ...], placements: tuple[Placement, ...], values_only: bool) -> str | None:
    sums = dict(_partial_sums)
    _partial_sums.clear()
    if not values_only:
        return None
    for k, parts in sums.items():
        total = torch.stack([p.to(expected[k].dtype) for p in parts]).sum(0)
        if not torch.allclose(total, expected[k], atol=ATOL, rtol=RTOL, equal_nan=True):
            return f"output {k} P: ranks add up to a different tensor ({_diff(total, expected[k])})"
    return None
