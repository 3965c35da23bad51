"""Mixture-of-experts routing: top-k, sorts, expert histograms and the grouped expert matmul.

A router picks experts per token (``topk`` over the expert dim), the experts sort the picks by
expert (``sort``), count them (``histc``) and run one grouped matmul over all experts, whose
``offs[e]`` is the end row of expert ``e``'s group::

    topk/sort/argsort  any dim but the sorted one may be split (rows are independent)
    histc(x, min<max)  x split on any dim -> P: the counts of the parts add up
    floor_divide       elementwise with broadcasting, no partial sum (not linear)
    grouped_mm(x[S, k], w[E, k, n], offs[E])
      column: x R,     w S(2), offs R -> S(1)
      row:    x S(1),  w S(1), offs R -> P

The rows of the grouped matmul are never split: ``offs`` holds global row numbers. Splitting the
expert dim (expert parallelism proper) needs tokens sent between ranks and is not offered.
transformers' CPU fallback ``transformers::grouped_mm_fallback`` is registered by name, so
autotp does not import transformers.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch import fx

from autotp.ir.placement import P, R, Shard
from autotp.strategies.rules.matmul import einsum_strategies
from autotp.strategies.rules.pointwise import broadcast_strategies
from autotp.strategies.rules.registry import OpContext, OpStrategy, norm_dim, register
from autotp.strategies.rules.scan import other_dims

aten = __import__("torch").ops.aten


@register(aten.topk, aten.sort, aten.argsort)
def sorted_along(ctx: OpContext) -> Iterator[OpStrategy]:
    """Top-k, sort (values, indices) and argsort along ``dim`` (located by name: ``sort.stable``
    takes it by keyword); the other dims' lines are independent."""
    yield from other_dims(ctx, norm_dim(ctx.named_arg("dim", -1), ctx.inputs[0].ndim))


@register(aten.histc)
def histc(ctx: OpContext) -> Iterator[OpStrategy]:
    """Counts over a fixed range add up over any split of the input. With ``min == max`` the
    range is each rank's own data range, which differs per rank: nothing is offered then."""
    low, high = ctx.named_arg("min", 0), ctx.named_arg("max", 0)
    if low >= high:
        return
    for d in range(ctx.inputs[0].ndim):
        yield OpStrategy((Shard(d),), P)


@register(aten.floor_divide)
def floor_divide(ctx: OpContext) -> Iterator[OpStrategy]:
    """Not tagged pointwise in torch, so the pointwise fallback does not see it."""
    yield from broadcast_strategies(ctx)


def _tensor_arg(ctx: OpContext, name: str) -> bool:
    return isinstance(ctx.named_arg(name), fx.Node)


def _grouped_over_experts(has_bias: bool) -> Iterator[OpStrategy]:
    """x[S, k] @ w[E, k, n] in groups of rows given by offs[E] (+ bias[E, n])."""
    yield OpStrategy((R, Shard(2), R) + ((Shard(1),) if has_bias else ()), Shard(1))
    if not has_bias:  # a row split would add the bias once per rank
        yield OpStrategy((Shard(1), Shard(1), R), P)
        yield OpStrategy((P, R, R), P)
        yield OpStrategy((R, P, R), P)


@register("transformers::grouped_mm_fallback")
def grouped_mm_fallback(ctx: OpContext) -> Iterator[OpStrategy]:
    """transformers' grouped matmul: input[S, k], weight[E, k, n], offs[E] -> [S, n]."""
    yield from _grouped_over_experts(has_bias=False)


@register(aten._grouped_mm)
def grouped_mm(ctx: OpContext) -> Iterator[OpStrategy]:
    """torch's grouped matmul. Offered for the two forms MoE layers use: 2-D input by 3-D
    weights grouped by ``offs``, and a 3-D batch of matmuls (a bmm); other forms run replicated."""
    a, b = ctx.inputs[0], ctx.inputs[1]
    has_offs, has_bias = _tensor_arg(ctx, "offs"), _tensor_arg(ctx, "bias")
    if a.ndim == 2 and b.ndim == 3 and has_offs:
        candidates: Iterator[OpStrategy] = _grouped_over_experts(has_bias)
    elif a.ndim == 3 and b.ndim == 3 and not has_offs and not has_bias:
        candidates = einsum_strategies(["bmk", "bkn"], "bmn", ctx.inputs)
    else:
        return
    yield from (s for s in candidates if _aligned(s, ctx))


def _aligned(strategy: OpStrategy, ctx: OpContext) -> bool:
    """The kernel wants every row stride a multiple of 16 bytes, on each rank too: splitting an
    operand's last dim shrinks its row stride to ``size / tp`` elements."""
    return all(
        not (isinstance(p, Shard) and p.dim == meta.ndim - 1) or (meta.shape[-1] // ctx.tp_size * meta.dtype.itemsize) % 16 == 0
        for p, meta in zip(strategy.inputs, ctx.inputs)
    )
