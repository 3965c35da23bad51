"""View, reshape and data-movement ops: where a split dim of the input lands in the output.

For reshape, input dim ``d`` split into ``tp`` contiguous chunks lands on output dim ``e`` when
both cover the same flat blocks, i.e. ``prod(in_shape[d:]) == prod(out_shape[e:])`` (and the
engine checks both sizes divide by ``tp``)::

    view([B, T, C] -> [B, T, nh, hd]):   C (dim 2) -> nh (dim 2)     heads stay whole
    view([B, T, C] -> [B*T, C]):         B (dim 0) -> B*T (dim 0);   T has no image

Every view is linear, so ``P -> P``. Shape arguments are rewritten to the local output shape.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

from autotp.ir.placement import P, Placement, R, Shard
from autotp.strategies.rules.registry import LocalContext, OpContext, OpStrategy, norm_dim, register, with_arg

aten = __import__("torch").ops.aten


def local_shape(shape: Sequence[int], placement: Placement, tp_size: int) -> list[int]:
    local = list(shape)
    if isinstance(placement, Shard):
        local[placement.dim] //= tp_size
    return local


def reshape_dim_map(in_shape: Sequence[int], out_shape: Sequence[int]) -> dict[int, int]:
    """Input dim -> output dim that carries the same contiguous chunks (sizes > 1 only)."""
    out_suffix = {math.prod(out_shape[e:]): e for e in reversed(range(len(out_shape))) if out_shape[e] > 1}
    mapping = {}
    for d in range(len(in_shape)):
        if in_shape[d] > 1:
            e = out_suffix.get(math.prod(in_shape[d:]))
            if e is not None:
                mapping[d] = e
    return mapping


def _with_partial(strategies: Iterator[OpStrategy], n_inputs: int = 1) -> Iterator[OpStrategy]:
    yield from strategies
    yield OpStrategy((P,) * n_inputs, P)


def localize_size(arg_index: int, name: str):
    """Replace the size argument with the local output shape (views, constructors)."""

    def localize(args: tuple[Any, ...], kwargs: dict[str, Any], lc: LocalContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
        size = local_shape(lc.output.shape, lc.strategy.output, lc.tp_size)  # type: ignore[arg-type, union-attr]  # a single-output op
        return with_arg(args, kwargs, index=arg_index, name=name, value=size)

    return localize


@register(aten.view, aten.reshape, aten._unsafe_view, localize=localize_size(1, "size"), view=True)
def reshape(ctx: OpContext) -> Iterator[OpStrategy]:
    mapping = reshape_dim_map(ctx.inputs[0].shape, ctx.output.shape)  # type: ignore[union-attr]  # a single-output op
    yield from _with_partial(OpStrategy((Shard(d),), Shard(e)) for d, e in mapping.items())


@register(aten.flatten, view=True)
def flatten(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from reshape(ctx)


def _localize_unflatten(args: tuple[Any, ...], kwargs: dict[str, Any], lc: LocalContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
    dim = norm_dim(args[1], lc.inputs[0].ndim)
    out_local = local_shape(lc.output.shape, lc.strategy.output, lc.tp_size)  # type: ignore[arg-type, union-attr]  # a single-output op
    sizes = out_local[dim:dim + len(args[2])]
    return (args[0], args[1], sizes) + tuple(args[3:]), kwargs


register(aten.unflatten, localize=_localize_unflatten, view=True)(reshape)


@register(aten.transpose, view=True)
def transpose(ctx: OpContext) -> Iterator[OpStrategy]:
    ndim = ctx.inputs[0].ndim
    a, b = norm_dim(ctx.args[1], ndim), norm_dim(ctx.args[2], ndim)
    swap = {a: b, b: a}
    yield from _with_partial(OpStrategy((Shard(d),), Shard(swap.get(d, d))) for d in range(ndim))


@register(aten.t, view=True)
def t(ctx: OpContext) -> Iterator[OpStrategy]:
    ndim = ctx.inputs[0].ndim
    yield from _with_partial(OpStrategy((Shard(d),), Shard(ndim - 1 - d)) for d in range(ndim))


@register(aten.permute, view=True)
def permute(ctx: OpContext) -> Iterator[OpStrategy]:
    ndim = ctx.inputs[0].ndim
    dims = [norm_dim(d, ndim) for d in ctx.args[1]]
    yield from _with_partial(OpStrategy((Shard(d),), Shard(dims.index(d))) for d in range(ndim))


@register(aten.unsqueeze, view=True)
def unsqueeze(ctx: OpContext) -> Iterator[OpStrategy]:
    ndim = ctx.inputs[0].ndim
    new = norm_dim(ctx.args[1], ndim + 1)
    yield from _with_partial(OpStrategy((Shard(d),), Shard(d if d < new else d + 1)) for d in range(ndim))


def _localize_squeeze(args: tuple[Any, ...], kwargs: dict[str, Any], lc: LocalContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Name the squeezed dims: a split dim whose local size is 1 must survive."""
    squeezed = [d for d, size in enumerate(lc.inputs[0].shape) if size == 1]
    if len(args) > 1:
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        squeezed = [d for d in (norm_dim(d, lc.inputs[0].ndim) for d in dims) if lc.inputs[0].shape[d] == 1]
    return (args[0], squeezed), kwargs


@register(aten.squeeze, localize=_localize_squeeze, view=True)
def squeeze(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from reshape(ctx)


@register(aten.expand, localize=localize_size(1, "size"), view=True)
def expand(ctx: OpContext) -> Iterator[OpStrategy]:
    """Real dims keep their split; an expanded dim can be split on the output alone."""
    x, out = ctx.inputs[0], ctx.output
    offset = out.ndim - x.ndim  # type: ignore[union-attr]  # a single-output op
    for e in range(out.ndim):  # type: ignore[union-attr]  # a single-output op
        d = e - offset
        if d >= 0 and x.shape[d] == out.shape[e]:  # type: ignore[union-attr]  # a single-output op
            yield OpStrategy((Shard(d),), Shard(e))
        else:
            yield OpStrategy((R,), Shard(e))
    yield OpStrategy((P,), P)


@register(aten.slice, view=True)
def slice_(ctx: OpContext) -> Iterator[OpStrategy]:
    """Other dims keep their split; the sliced dim too when the slice keeps all of it
    (``x[:, 0:]``, ``x[:, :2**63-1]``): the local slice then keeps all of each chunk."""
    x = ctx.inputs[0]
    dim = norm_dim(ctx.arg(1, "dim", 0), x.ndim)
    whole = ctx.arg(2, "start") in (None, 0) and ctx.arg(4, "step", 1) == 1 and ctx.output.shape[dim] == x.shape[dim]  # type: ignore[union-attr]  # a single-output op
    yield from _with_partial(OpStrategy((Shard(d),), Shard(d)) for d in range(x.ndim) if d != dim or whole)


@register(aten.repeat)
def repeat(ctx: OpContext) -> Iterator[OpStrategy]:
    """``x.repeat(*repeats)`` tiles x; a dim repeated once keeps its split (new dims lead)."""
    x = ctx.inputs[0]
    repeats = list(ctx.arg(1, "repeats"))
    lead = len(repeats) - x.ndim
    yield from _with_partial(OpStrategy((Shard(d),), Shard(lead + d)) for d in range(x.ndim) if repeats[lead + d] == 1)


@register(aten.select, view=True)
def select(ctx: OpContext) -> Iterator[OpStrategy]:
    ndim = ctx.inputs[0].ndim
    dim = norm_dim(ctx.args[1], ndim)
    yield from _with_partial(
        OpStrategy((Shard(d),), Shard(d if d < dim else d - 1)) for d in range(ndim) if d != dim
    )


@register(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, view=True)
def split(ctx: OpContext) -> Iterator[OpStrategy]:
    """Split along one dim into a tuple; any other dim keeps its split on every piece."""
    ndim = ctx.inputs[0].ndim
    is_unbind = ctx.node.target.overloadpacket in (aten.unbind, aten.unbind_copy)  # type: ignore[union-attr]  # a call_function target is an OpOverload
    dim = norm_dim(ctx.arg(1, "dim", 0) if is_unbind else ctx.arg(2, "dim", 0), ndim)
    count = len(ctx.output)  # type: ignore[arg-type]  # a split's output is a tuple
    for d in range(ndim):
        if d != dim:
            out_d = d - 1 if is_unbind and d > dim else d
            yield OpStrategy((Shard(d),), (Shard(out_d),) * count)
    yield OpStrategy((P,), (P,) * count)


@register(aten.cat, aten.concat)
def cat(ctx: OpContext) -> Iterator[OpStrategy]:
    n = len(ctx.inputs)
    ndim = ctx.output.ndim  # type: ignore[union-attr]  # a single-output op
    dim = norm_dim(ctx.arg(1, "dim", 0), ndim)
    for d in range(ndim):
        if d != dim and all(m.ndim == ndim for m in ctx.inputs):
            yield OpStrategy((Shard(d),) * n, Shard(d))
    yield OpStrategy((P,) * n, P)


@register(aten.stack)
def stack(ctx: OpContext) -> Iterator[OpStrategy]:
    n = len(ctx.inputs)
    ndim = ctx.inputs[0].ndim
    dim = norm_dim(ctx.arg(1, "dim", 0), ndim + 1)
    for d in range(ndim):
        yield OpStrategy((Shard(d),) * n, Shard(d if d < dim else d + 1))
    yield OpStrategy((P,) * n, P)


@register(operator.getitem, view=True)
def getitem(ctx: OpContext) -> Iterator[OpStrategy]:
    """Picks one output of a multi-output op; it keeps whatever placement that output has."""
    for d in range(ctx.output.ndim):  # type: ignore[union-attr]  # a single-output op
        yield OpStrategy((Shard(d),), Shard(d))
    yield OpStrategy((P,), P)


@register(aten.index_select)
def index_select(ctx: OpContext) -> Iterator[OpStrategy]:
    x = ctx.inputs[0]
    dim = norm_dim(ctx.args[1], x.ndim)
    for d in range(x.ndim):
        if d != dim:
            yield OpStrategy((Shard(d), R), Shard(d))
    yield OpStrategy((R, Shard(0)), Shard(dim))


@register(aten.flip, aten.roll)
def flip(ctx: OpContext) -> Iterator[OpStrategy]:
    """Dims not flipped or rolled keep their split; ``roll`` without dims rolls the flattened
    tensor, which moves elements across every dim."""
    ndim = ctx.inputs[0].ndim
    is_roll = ctx.node.target.overloadpacket is aten.roll  # type: ignore[union-attr]  # a call_function target is an OpOverload
    moved = list(ctx.arg(2, "dims", ()) if is_roll else ctx.arg(1, "dims"))
    whole = set(range(ndim)) if is_roll and not moved else {norm_dim(d, ndim) for d in moved}
    yield from _with_partial(OpStrategy((Shard(d),), Shard(d)) for d in range(ndim) if d not in whole)


@register(aten.diagonal, view=True)
def diagonal(ctx: OpContext) -> Iterator[OpStrategy]:
    """The output has x's other dims in order, then the diagonal: they keep their split."""
    ndim = ctx.inputs[0].ndim
    pair = {norm_dim(ctx.arg(2, "dim1", 0), ndim), norm_dim(ctx.arg(3, "dim2", 1), ndim)}
    others = [d for d in range(ndim) if d not in pair]
    yield from _with_partial(OpStrategy((Shard(d),), Shard(e)) for e, d in enumerate(others))


register(aten.diagonal_copy)(diagonal)


@register(aten.diag_embed)
def diag_embed(ctx: OpContext) -> Iterator[OpStrategy]:
    """x's last dim becomes the diagonal of output dims ``dim1``/``dim2``; x's other dims fill
    the remaining output dims in order and keep their split."""
    ndim = ctx.inputs[0].ndim
    pair = {norm_dim(ctx.arg(2, "dim1", -2), ndim + 1), norm_dim(ctx.arg(3, "dim2", -1), ndim + 1)}
    others = [e for e in range(ndim + 1) if e not in pair]
    yield from _with_partial(OpStrategy((Shard(d),), Shard(others[d])) for d in range(ndim - 1))


@register(aten.diag)
def diag(ctx: OpContext) -> Iterator[OpStrategy]:
    """A vector to a matrix or a matrix to its diagonal: every dim takes part, so no split; the
    op is linear, so ``P -> P``."""
    yield OpStrategy((P,), P)


@register(aten.select_scatter, aten.slice_scatter, aten.diagonal_scatter)
def view_scatter(ctx: OpContext) -> Iterator[OpStrategy]:
    """Writes ``src`` into the view ``select``/``slice``/``diagonal`` takes of ``x``: a dim of ``x``
    the view keeps splits with its image in ``src``. Linear in ``x`` and ``src``: ``P, P -> P``."""
    ndim = ctx.inputs[0].ndim
    packet = ctx.node.target.overloadpacket  # type: ignore[union-attr]  # a call_function target is an OpOverload
    if packet is aten.diagonal_scatter:
        pair = {norm_dim(ctx.arg(3, "dim1", 0), ndim), norm_dim(ctx.arg(4, "dim2", 1), ndim)}
        image = {d: e for e, d in enumerate(d for d in range(ndim) if d not in pair)}
    else:
        dim = norm_dim(ctx.arg(2, "dim", 0), ndim)
        drop = packet is aten.select_scatter
        image = {d: d - 1 if drop and d > dim else d for d in range(ndim) if d != dim}
    yield from _with_partial((OpStrategy((Shard(d), Shard(e)), Shard(d)) for d, e in image.items()), 2)


# The ``_copy`` variants (what functionalization emits for views) copy the view's result: the view's
# rule and shape-argument rewriting, but they launch a kernel, so they are not ``view=True``.
register(aten.view_copy.default, localize=localize_size(1, "size"))(reshape)
register(aten.expand_copy, localize=localize_size(1, "size"))(expand)
register(aten.squeeze_copy, localize=_localize_squeeze)(squeeze)
register(aten.permute_copy)(permute)
register(aten.transpose_copy)(transpose)
register(aten.t_copy)(t)
register(aten.unsqueeze_copy)(unsqueeze)
register(aten.slice_copy)(slice_)
register(aten.select_copy)(select)
register(aten.split_copy, aten.split_with_sizes_copy, aten.unbind_copy)(split)


@register(aten.alias_copy)
def alias_copy(ctx: OpContext) -> Iterator[OpStrategy]:
    """A copy of the whole tensor: any split, or a partial sum, carries over."""
    yield from _with_partial(OpStrategy((Shard(d),), Shard(d)) for d in range(ctx.inputs[0].ndim))


def bitcast(ctx: OpContext) -> Iterator[OpStrategy]:
    """``view(dtype)`` reinterprets the bits: a dtype of another width rescales the last dim, which
    then stays whole; the rest keep their split. No partial sum: bits do not add like values."""
    x, out = ctx.inputs[0], ctx.output
    whole_last = x.shape[-1:] != out.shape[-1:]  # type: ignore[union-attr]  # a single-output op
    for d in range(x.ndim - 1 if whole_last else x.ndim):
        yield OpStrategy((Shard(d),), Shard(d))


register(aten.view.dtype, view=True)(bitcast)
register(aten.view_copy.dtype)(bitcast)


@register(aten.view_as_complex, view=True)
def view_as_complex(ctx: OpContext) -> Iterator[OpStrategy]:
    """``[..., 2]`` real pairs -> ``[...]`` complex: the pair dim stays whole, any other splits."""
    yield from _with_partial(OpStrategy((Shard(d),), Shard(d)) for d in range(ctx.inputs[0].ndim - 1))


@register(aten.view_as_real, view=True)
def view_as_real(ctx: OpContext) -> Iterator[OpStrategy]:
    """``[...]`` complex -> ``[..., 2]`` real pairs: any input dim splits; the new pair dim does not."""
    yield from _with_partial(OpStrategy((Shard(d),), Shard(d)) for d in range(ctx.inputs[0].ndim))
