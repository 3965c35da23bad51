"""Reductions, softmax and normalisation: any dim the op does not reduce over may be split.

``sum`` over a split dim leaves each rank a partial sum (``S(d) -> P``); ``sum`` and ``mean``
are linear, so ``P -> P``. ``mean`` over a split dim is not offered: the local mean of a chunk
is not a summand of the global mean without rescaling.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from autotp.ir.placement import P, R, Shard
from autotp.strategies.rules.registry import OpContext, OpStrategy, norm_dim, register

aten = __import__("torch").ops.aten


def _reduced_dims(dims: int | Sequence[int] | None, ndim: int) -> set[int]:
    if dims is None or (isinstance(dims, Sequence) and len(dims) == 0):
        return set(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return {norm_dim(d, ndim) for d in dims}


def _kept_dim(d: int, reduced: set[int], keepdim: bool) -> int:
    return d if keepdim else d - sum(1 for r in reduced if r < d)


def _reduced_and_keepdim(ctx: OpContext) -> tuple[set[int], bool]:
    return _reduced_dims(ctx.named_arg("dim"), ctx.inputs[0].ndim), bool(ctx.named_arg("keepdim", False))


def reduction(ctx: OpContext, *, partial_over_reduced: bool) -> Iterator[OpStrategy]:
    x = ctx.inputs[0]
    reduced, keepdim = _reduced_and_keepdim(ctx)
    for d in range(x.ndim):
        if d not in reduced:
            yield OpStrategy((Shard(d),), Shard(_kept_dim(d, reduced, keepdim)))
        elif partial_over_reduced:
            yield OpStrategy((Shard(d),), P)
    yield OpStrategy((P,), P)


@register(aten.sum)
def sum_(ctx: OpContext) -> Iterator[OpStrategy]:
    if ctx.named_arg("dim") is None:  # sum.default: every dim
        for d in range(ctx.inputs[0].ndim):
            yield OpStrategy((Shard(d),), P)
        yield OpStrategy((P,), P)
        return
    yield from reduction(ctx, partial_over_reduced=True)


@register(aten.mean)
def mean(ctx: OpContext) -> Iterator[OpStrategy]:
    if ctx.named_arg("dim") is None:
        yield OpStrategy((P,), P)
        return
    yield from reduction(ctx, partial_over_reduced=False)


@register(aten.amax, aten.amin, aten.var, aten.std, aten.argmax, aten.argmin, aten.logsumexp)
def non_linear_reduction(ctx: OpContext) -> Iterator[OpStrategy]:
    x = ctx.inputs[0]
    reduced, keepdim = _reduced_and_keepdim(ctx)
    for d in range(x.ndim):
        if d not in reduced:
            yield OpStrategy((Shard(d),), Shard(_kept_dim(d, reduced, keepdim)))


@register(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax)
def softmax(ctx: OpContext) -> Iterator[OpStrategy]:
    x = ctx.inputs[0]
    dim = norm_dim(ctx.named_arg("dim"), x.ndim)
    for d in range(x.ndim):
        if d != dim:
            yield OpStrategy((Shard(d),), Shard(d))


@register(aten.layer_norm, aten.rms_norm)
def layer_norm(ctx: OpContext) -> Iterator[OpStrategy]:
    """Normalised (trailing) dims stay whole; weight and bias are replicated."""
    x = ctx.inputs[0]
    normalized = len(ctx.arg(1, "normalized_shape"))
    for d in range(x.ndim - normalized):
        yield OpStrategy((Shard(d),) + (R,) * (len(ctx.inputs) - 1), Shard(d))


@register(aten.native_layer_norm)
def native_layer_norm(ctx: OpContext) -> Iterator[OpStrategy]:
    """Returns (out, mean, rstd); mean/rstd have the leading dims of x and size-1 trailing dims."""
    x = ctx.inputs[0]
    normalized = len(ctx.arg(1, "normalized_shape"))
    for d in range(x.ndim - normalized):
        yield OpStrategy((Shard(d),) + (R,) * (len(ctx.inputs) - 1), (Shard(d),) * 3)
