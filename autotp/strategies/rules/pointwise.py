"""Elementwise ops with broadcasting, and which of them carry a partial sum through.

Sharding output dim ``d`` shards every input that really has that dim (after right-aligned
broadcasting) and replicates inputs broadcast along it: ``x[B,T,C] + b[C]`` with x ``S(1)`` keeps
b ``R``. A partial sum passes through linear ops only: ``P + P -> P``, ``P * R -> P``,
``P / R -> P``, ``-P -> P``, casts and copies of ``P``.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch import fx

from autotp.capture.torch_compat import OpOverload
from autotp.ir.placement import P, Placement, R, Shard
from autotp.strategies.rules.registry import OpContext, OpStrategy, Rule, register, set_pointwise_fallback

aten = __import__("torch").ops.aten


def broadcast_strategies(ctx: OpContext) -> Iterator[OpStrategy]:
    """One strategy per output dim: shard it on the output and on every input that has it.

    A multi-output elementwise op (``frexp``: mantissa and exponent) splits every output alike;
    outputs of different shapes get no split.
    """
    outs = ctx.output if isinstance(ctx.output, tuple) else (ctx.output,)
    out = outs[0]
    if any(o.shape != out.shape for o in outs):
        return
    for d in range(out.ndim):
        inputs: list[Placement] = []
        for meta in ctx.inputs:
            dk = d - (out.ndim - meta.ndim)
            inputs.append(Shard(dk) if dk >= 0 and meta.shape[dk] == out.shape[d] else R)
        yield OpStrategy(tuple(inputs), (Shard(d),) * len(outs) if isinstance(ctx.output, tuple) else Shard(d))


def _tensor_operands(node: fx.Node, count: int) -> bool:
    return len(node.args) >= count and all(isinstance(a, fx.Node) for a in node.args[:count])


def pointwise(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from broadcast_strategies(ctx)
    target = ctx.node.target
    packet = target.overloadpacket if isinstance(target, OpOverload) else target
    n = len(ctx.inputs)
    joint = _tensor_operands(ctx.node, 2) if packet in _BINARY else n == 1
    if packet in _PARTIAL_ALL and joint:
        yield OpStrategy((P,) * n, P)
    elif packet in _PARTIAL_FIRST and n >= 1 and ctx.named_arg("rounding_mode") is None:
        yield OpStrategy((P,) + (R,) * (n - 1), P)
    elif packet in _PARTIAL_ANY_ONE:
        for i in range(n):
            yield OpStrategy(tuple(P if j == i else R for j in range(n)), P)


_BINARY = {aten.add, aten.sub}
# linear in every tensor input jointly: P op P -> P (add/sub only when both operands are tensors:
# P + 1.0 would add 1.0 once per rank)
_PARTIAL_ALL = {aten.add, aten.sub, aten.neg, aten.clone, aten.contiguous, aten._to_copy, aten.to, aten.alias, aten.type_as}
# linear in the first input with the others fixed: P / R -> P (not with a rounding mode)
_PARTIAL_FIRST = {aten.div}
# linear in each input separately: P * R -> P, R * P -> P
_PARTIAL_ANY_ONE = {aten.mul}

set_pointwise_fallback(Rule(pointwise))

register(
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.clone, aten.contiguous, aten._to_copy,
    aten.to, aten.alias, aten.dropout, aten.masked_fill, aten.where,
    aten.gelu, aten.silu, aten.relu, aten.tanh, aten.sigmoid, aten.exp, aten.rsqrt, aten.sqrt,
    aten.pow, aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.detach,
    aten.lift_fresh_copy, aten.__and__, aten.__or__,  # the two Python operators not tagged pointwise
)(pointwise)


@register(aten.triu, aten.tril)
def triangular(ctx: OpContext) -> Iterator[OpStrategy]:
    """triu/tril look at the last two dims; any leading dim may be split."""
    ndim = ctx.output.ndim  # type: ignore[union-attr]  # a single-output op
    for d in range(ndim - 2):
        yield OpStrategy((Shard(d),), Shard(d))


# type_as(x, other) reads only other's dtype
register(aten.type_as, metadata_args=(1,))(pointwise)
