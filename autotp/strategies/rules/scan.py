"""Scans along one dim: ``cumsum``, ``cumprod``, ``logcumsumexp``, ``cummax``/``cummin``, ``diff``.

Each output element depends only on its own line along ``dim``, so any other dim may be split
(``diff``'s ``prepend``/``append`` split with ``x``; ``cummax``'s values and indices alike).
``cumsum`` and ``diff`` are linear, so a partial sum passes through: ``cumsum(P) -> P``,
``diff(P, prepend=P) -> P``.
"""
from __future__ import annotations

from collections.abc import Iterator

from autotp.ir.placement import P, Shard
from autotp.strategies.rules.registry import OpContext, OpStrategy, norm_dim, register

aten = __import__("torch").ops.aten


def other_dims(ctx: OpContext, dim: int) -> Iterator[OpStrategy]:
    """Every dim but ``dim`` split alike on every input (where it has x's size) and every output:
    the strategies of an op whose lines along ``dim`` are independent (scans, sorts, top-k,
    softmax and its backward)."""
    x = ctx.inputs[0]
    outputs = len(ctx.output) if isinstance(ctx.output, tuple) else 0
    for d in range(x.ndim):
        if d != dim and all(m.ndim == x.ndim and m.shape[d] == x.shape[d] for m in ctx.inputs):
            yield OpStrategy((Shard(d),) * len(ctx.inputs), (Shard(d),) * outputs if outputs else Shard(d))


@register(aten.cumsum)
def cumsum(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from other_dims(ctx, norm_dim(ctx.arg(1, "dim"), ctx.inputs[0].ndim))
    yield OpStrategy((P,), P)


@register(aten.cumprod, aten.logcumsumexp)
def cumprod(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from other_dims(ctx, norm_dim(ctx.arg(1, "dim"), ctx.inputs[0].ndim))


@register(aten.cummax, aten.cummin)
def cummax(ctx: OpContext) -> Iterator[OpStrategy]:
    """Returns (values, indices), both with x's shape."""
    yield from other_dims(ctx, norm_dim(ctx.arg(1, "dim"), ctx.inputs[0].ndim))


@register(aten.diff)
def diff(ctx: OpContext) -> Iterator[OpStrategy]:
    """diff(x, n, dim, prepend, append) = x[1:] - x[:-1] along dim of cat(prepend, x, append)."""
    yield from other_dims(ctx, norm_dim(ctx.arg(2, "dim", -1), ctx.inputs[0].ndim))
    yield OpStrategy((P,) * len(ctx.inputs), P)
