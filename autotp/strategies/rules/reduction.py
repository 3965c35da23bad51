"""Reductions, softmax and normalisation: any dim the op does not reduce over may be split.

``sum`` over a split dim leaves each rank a partial sum (``S(d) -> P``); ``sum`` and ``mean``
are linear, so ``P -> P``. ``mean`` over a split dim is not offered: the local mean of a chunk
is not a summand of the global mean without rescaling. ``nansum`` over a split dim adds up like
``sum``, but not ``P -> P``: a NaN in one summand is dropped while the others are kept.

Non-linear reductions (``prod``, ``amax``, norms, ``any``/``all``, ``var``) and the value+index
reductions (``max.dim``, ``kthvalue``, ``median.dim``, ``mode``: a ``(values, indices)`` pair,
both split alike) split only the dims they keep. A reduction over every dim (``max()``,
``median()``) keeps none, so it runs replicated.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from autotp.ir.placement import P, R, Shard
from autotp.strategies.rules.registry import OpContext, OpStrategy, norm_dim, register
from autotp.strategies.rules.scan import other_dims

aten = __import__("torch").ops.aten


def _reduced_dims(dims: int | Sequence[int] | None, ndim: int) -> set[int]:
    if dims is None or (isinstance(dims, Sequence) and len(dims) == 0):
        return set(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return {norm_dim(d, ndim) for d in dims}


def _kept_dim(d: int, reduced: set[int], keepdim: bool) -> int:
    return d if keepdim else d - sum(1 for r in reduced if r < d)


def _reduced_and_keepdim(ctx: OpContext, default_dim: int | None = None) -> tuple[set[int], bool]:
    """The reduced dims (``dim`` absent or ``None``: ``default_dim``, or every dim) and keepdim."""
    dims = ctx.named_arg("dim")
    return _reduced_dims(default_dim if dims is None else dims, ctx.inputs[0].ndim), bool(ctx.named_arg("keepdim", False))


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


def _kept_splits(ctx: OpContext, default_dim: int | None = None) -> Iterator[tuple[int, int]]:
    """(input dim, output dim) of every dim the reduction keeps."""
    reduced, keepdim = _reduced_and_keepdim(ctx, default_dim)
    for d in range(ctx.inputs[0].ndim):
        if d not in reduced:
            yield d, _kept_dim(d, reduced, keepdim)


@register(
    aten.amax, aten.amin, aten.var, aten.std, aten.argmax, aten.argmin, aten.logsumexp,
    aten.prod.default, aten.prod.dim_int, aten.linalg_vector_norm, aten.norm.Scalar,
    aten.norm.ScalarOpt_dim, aten.norm.ScalarOpt_dim_dtype, aten.norm.ScalarOpt_dtype,
    aten.any.default, aten.any.dim, aten.any.dims, aten.all.default, aten.all.dim, aten.all.dims,
)
def non_linear_reduction(ctx: OpContext) -> Iterator[OpStrategy]:
    for d, e in _kept_splits(ctx):
        yield OpStrategy((Shard(d),), Shard(e))


@register(aten.nansum)
def nansum(ctx: OpContext) -> Iterator[OpStrategy]:
    reduced, keepdim = _reduced_and_keepdim(ctx)
    for d in range(ctx.inputs[0].ndim):
        yield OpStrategy((Shard(d),), P if d in reduced else Shard(_kept_dim(d, reduced, keepdim)))


@register(aten.var_mean, aten.std_mean)
def var_mean(ctx: OpContext) -> Iterator[OpStrategy]:
    """Returns (var or std, mean), both reduced alike."""
    for d, e in _kept_splits(ctx):
        yield OpStrategy((Shard(d),), (Shard(e), Shard(e)))


# (values, indices) along one dim; kthvalue and mode default to the last dim
@register(aten.max.dim, aten.min.dim, aten.median.dim, aten.nanmedian.dim, aten.kthvalue, aten.mode)
def value_index_reduction(ctx: OpContext) -> Iterator[OpStrategy]:
    for d, e in _kept_splits(ctx, default_dim=-1):
        yield OpStrategy((Shard(d),), (Shard(e), Shard(e)))


@register(aten.max.default, aten.min.default, aten.median.default, aten.nanmedian.default)
def whole_reduction(ctx: OpContext) -> Iterator[OpStrategy]:
    """One value of the whole tensor: no split and no partial (a max or median of chunks is
    not a summand of the whole's), so it runs replicated."""
    yield from ()


@register(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax, aten._safe_softmax)
def softmax(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from other_dims(ctx, norm_dim(ctx.named_arg("dim"), ctx.inputs[0].ndim))


@register(aten._softmax_backward_data, aten._log_softmax_backward_data)
def softmax_backward(ctx: OpContext) -> Iterator[OpStrategy]:
    """``(grad_output, output, dim)``: each row's gradient needs its whole softmax row, so any
    other dim splits, on both inputs and the gradient alike."""
    yield from other_dims(ctx, norm_dim(ctx.named_arg("dim"), ctx.inputs[0].ndim))


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
