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
random input, so use non-degenerate values (a zero bias hides a bias added once per rank). Ops
that draw random numbers or return uninitialised memory are checked for shape and dtype only.
Tolerances are for float32.

    values = node_values(captured, model, inputs)
    checked, failures = check_graph(captured, values, tp_size=3)   # failures == [] when all hold
"""
from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from autotp.capture.export import CapturedGraph, InputRole
from autotp.capture.torch_compat import OpOverload, op_schema, pytree
from autotp.ir.placement import Partial, Placement, Shard
from autotp.ir.strategy import one_axis
from autotp.rewrite.rewriter import local_call
from autotp.strategies.engine import (
    NodeKind,
    NodeSpace,
    ValueRef,
    build_strategy_space,
)
from autotp.strategies.rules.registry import OpStrategy, Rule, lookup

aten = torch.ops.aten

# float32 tolerances. Rounding in a P decomposition scales with the tensor's magnitude, so ``ATOL``
# is relative to the largest element (when that exceeds 1).
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
            flat.append(getattr(model.get_submodule(owner) if owner else model, name).detach())
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
) -> tuple[int, list[RuleFailure]]:
    """Check every strategy of every op node (but those run by a rule's ``local_impl``, which
    communicate and so need real ranks).

    Returns the number of (node, strategy) cases checked and the failures among them.
    """
    space = build_strategy_space(captured, tp_size)
    nodes = {n.name: n for n in captured.graph_module.graph.nodes}
    generator = torch.Generator().manual_seed(seed)
    checked, failures = 0, []
    for ns in space.nodes:
        if ns.kind is not NodeKind.OP:
            continue
        rule = lookup(nodes[ns.name].target)
        for strategy in (s.axis(0) for s in ns.strategies):
            if rule is not None and rule.local_impl is not None and rule.local_impl(strategy) is not None:
                continue  # runs collectives inside: checked on real ranks (tests/test_vocab_parallel.py)
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
    out_placements = strategy.outputs()
    for k, (value, placement) in enumerate(zip(expected_outs, out_placements)):
        if isinstance(placement, Partial) and not value.dtype.is_floating_point:
            return f"output {k} is {value.dtype} but placed P (only R or S make sense for integers)"
    local_inputs = [_split(v, p, tp_size, generator) for v, p in zip(slot_values, strategy.inputs)]
    rule = lookup(node.target)
    per_rank: list[tuple[Any, ...]] = []
    for rank in range(tp_size):
        try:
            out = _run_local(node, rule, space, strategy, [s[rank] for s in local_inputs], values, rank=rank, tp_size=tp_size)
        except Exception as exc:  # noqa: BLE001 -- any error means the local op cannot run as the strategy says
            return f"rank {rank} raised {type(exc).__name__}: {_first_line(exc)}"
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(expected_outs):
            return f"rank {rank} returned {len(outs)} outputs, expected {len(expected_outs)}"
        per_rank.append(outs)
    exact = values_comparable(node)
    for k, (want, placement) in enumerate(zip(expected_outs, out_placements)):
        reason = _compare(want, placement, [outs[k] for outs in per_rank], tp_size=tp_size, exact=exact)
        if reason is not None:
            return f"output {k} ({placement}): {reason}"
    return None


def _value(values: Mapping[str, Any], ref: ValueRef) -> torch.Tensor:
    value = values[ref.node]
    return value if ref.index is None else value[ref.index]


def _split(value: torch.Tensor, placement: Placement, tp_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Every rank's local tensor for ``placement`` (shards contiguous, as ``local_chunk`` makes them)."""
    if isinstance(placement, Shard):
        return [c.contiguous() for c in value.chunk(tp_size, placement.dim)]
    if isinstance(placement, Partial):
        scale = float(value.abs().mean()) or 1.0
        noise = [torch.randn(value.shape, generator=generator, dtype=value.dtype) * scale for _ in range(tp_size - 1)]
        return [value - sum(noise, torch.zeros_like(value))] + noise
    return [value] * tp_size


def _run_local(
    node: fx.Node,
    rule: Rule | None,
    space: NodeSpace,
    strategy: OpStrategy,
    inputs: list[torch.Tensor],
    values: Mapping[str, Any],
    *,
    rank: int,
    tp_size: int,
) -> Any:
    """The op on one rank, called the way ``autotp.rewrite.rewriter`` emits it.

    Metadata-only arguments (``rule.metadata_args``) get the whole tensor: only its dtype counts.
    """
    if node.target is operator.getitem:
        return inputs[0]  # the rewriter forwards the chosen output of the producer
    target, args, kwargs = local_call(node, rule, space, one_axis(strategy), inputs, values, coordinate=(rank,), mesh_shape=(tp_size,))
    with torch.no_grad():
        return target(*args, **kwargs)


def values_comparable(node: fx.Node) -> bool:
    """False for ops whose values cannot be compared: random draws and uninitialised memory.

    Dropout in eval mode (or with p = 0) and attention without dropout are deterministic although
    their schemas are tagged ``nondeterministic_seeded``.
    """
    target = node.target
    if not isinstance(target, OpOverload):
        return True
    packet = target.overloadpacket
    if packet in (aten.dropout, aten.native_dropout, aten.feature_dropout, aten.alpha_dropout):
        return _named_arg(node, "train") is False or _named_arg(node, "p") == 0
    if packet is aten.scaled_dot_product_attention:
        return _named_arg(node, "dropout_p", 0.0) == 0
    return torch.Tag.nondeterministic_seeded not in target.tags and "empty" not in packet.__name__


def _named_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    for index, argument in enumerate(op_schema(node.target).arguments):  # type: ignore[union-attr]
        if argument.name == name:
            return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)
    return default


def _compare(want: torch.Tensor, placement: Placement, locals_: list[torch.Tensor], *, tp_size: int, exact: bool) -> str | None:
    """Why the ranks' ``locals_`` are not ``want`` laid out as ``placement`` (``None`` if they are)."""
    if isinstance(placement, Shard):
        if placement.dim >= want.ndim:
            return f"the output has {want.ndim} dims"
        expected = list(want.chunk(tp_size, placement.dim))
    else:
        expected = [want] * tp_size
    for rank, (got, chunk) in enumerate(zip(locals_, expected)):
        if not isinstance(got, torch.Tensor):
            return f"rank {rank} returned {type(got).__name__}, not a tensor"
        if got.shape != chunk.shape or got.dtype != chunk.dtype:
            return f"rank {rank} has {tuple(got.shape)} {got.dtype}, expected {tuple(chunk.shape)} {chunk.dtype}"
    if not exact:
        return None
    if isinstance(placement, Partial):
        total = torch.stack(locals_).sum(0)
        return None if _close(total, want) else f"the ranks add up to a different tensor ({_diff(total, want)})"
    for rank, (got, chunk) in enumerate(zip(locals_, expected)):
        if not _close(got, chunk):
            return f"rank {rank} differs from the unsharded result ({_diff(got, chunk)})"
    return None


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if want.dtype.is_floating_point or want.dtype.is_complex:
        finite = want[torch.isfinite(want)]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        return torch.allclose(got, want, atol=ATOL * scale, rtol=RTOL, equal_nan=True)
    return torch.equal(got, want)


def _diff(got: torch.Tensor, want: torch.Tensor) -> str:
    if not want.dtype.is_floating_point:
        return f"{int((got != want).sum())} of {want.numel()} elements differ"
    finite = torch.isfinite(want) & torch.isfinite(got)
    err = (got - want)[finite].abs().max() if finite.any() else torch.tensor(float("nan"))
    return f"max abs error {float(err):.3g}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
