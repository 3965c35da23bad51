"""Indexing with tensors: advanced indexing ``x[idx0, :, idx2]``, ``gather``, and their writes.

Advanced indexing (``aten.index.Tensor``) broadcasts its index tensors to one shape ``B`` and
replaces the indexed dims of ``x`` by ``B``: in place when the indexed dims are adjacent, in front
otherwise (NumPy's rule)::

    x[B, T, C][i(B, 1), j(1, T)]        -> out[B, T, C]     B dims first: i's dim 0, j's dim 1
    x[B, T, C][:, j(4, 6)]              -> out[B, 4, 6, C]  in place of T

An unindexed dim of ``x`` may be split (the indices stay whole). A dim of ``B`` may be split by
splitting every index tensor that has it at full size (``x`` whole): each rank looks up its
chunk of positions. The lookup is linear in ``x``, so ``P`` passes through.

``gather(x, dim, index)`` reads ``x[.., index[.., j, ..], ..]`` along ``dim``; its output has
the index's shape. Another dim may be split on both where they have the same size; the
gathered dim only on the index (``x`` whole).

The writes (``scatter``, ``index_add``, ``index_put``...) keep the index whole along the dim
written: a rank holding part of it would write only its positions. Their in-place forms
(``scatter_``...) have the same strategies: the written ``x`` keeps its placement.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import fx

from autotp.ir.placement import P, Placement, R, Shard
from autotp.strategies.rules.registry import OpContext, OpStrategy, norm_dim, register
from autotp.strategies.rules.scan import other_dims

aten = torch.ops.aten


def index_layout(x_ndim: int, indexed: list[int], b_ndim: int) -> tuple[dict[int, int], int]:
    """Output dim of every unindexed dim of ``x``, and the output dim of ``B``'s dim 0."""
    rest = [d for d in range(x_ndim) if d not in indexed]
    if indexed == list(range(indexed[0], indexed[-1] + 1)):  # adjacent: B replaces them in place
        return {d: d if d < indexed[0] else d - len(indexed) + b_ndim for d in rest}, indexed[0]
    return {d: b_ndim + k for k, d in enumerate(rest)}, 0


@register(aten.index)
def index(ctx: OpContext) -> Iterator[OpStrategy]:
    x, *idx_metas = ctx.inputs
    indices = ctx.arg(1, "indices")
    indexed = [d for d, a in enumerate(indices) if isinstance(a, fx.Node)]
    if not indexed or len(idx_metas) != len(indexed):
        return
    if any(m.dtype in (torch.bool, torch.uint8) for m in idx_metas):  # masks: data-dependent shape
        return
    b_ndim = max(m.ndim for m in idx_metas)
    b_shape = [max((m.shape[j - (b_ndim - m.ndim)] for m in idx_metas if j - (b_ndim - m.ndim) >= 0), default=1) for j in range(b_ndim)]
    rest_out, b_start = index_layout(x.ndim, indexed, b_ndim)
    n_idx = len(idx_metas)
    for d, e in rest_out.items():  # an unindexed dim of x
        yield OpStrategy((Shard(d),) + (R,) * n_idx, Shard(e))
    for j in range(b_ndim):  # a dim of the broadcast index shape
        places: list[Placement] = [R]
        for m in idx_metas:
            jm = j - (b_ndim - m.ndim)
            places.append(Shard(jm) if jm >= 0 and m.shape[jm] == b_shape[j] else R)
        yield OpStrategy(tuple(places), Shard(b_start + j))
    yield OpStrategy((P,) + (R,) * n_idx, P)


@register(aten.gather)
def gather(ctx: OpContext) -> Iterator[OpStrategy]:
    x, idx = ctx.inputs[0], ctx.inputs[1]
    if x.ndim != idx.ndim:  # an empty index may have another rank (gather(0-d x, -1, empty)): nothing to split
        return
    dim = norm_dim(ctx.arg(1, "dim"), x.ndim)
    for d in range(idx.ndim):
        if d == dim:
            yield OpStrategy((R, Shard(d)), Shard(d))
        elif x.shape[d] == idx.shape[d]:
            yield OpStrategy((Shard(d), Shard(d)), Shard(d))
    yield OpStrategy((P, R), P)


def _scatter_splits(ctx: OpContext) -> Iterator[OpStrategy]:
    """``scatter(x, dim, index, src)`` writes ``src[.., j, ..]`` to ``x[.., index[.., j, ..], ..]``
    along ``dim``; ``index`` may be smaller than ``x`` and ``src``. Another dim may be split on all
    of them where they have the same size (the index stays whole along ``dim``)."""
    yield from other_dims(ctx, norm_dim(ctx.arg(1, "dim"), ctx.inputs[0].ndim))


register(
    aten.scatter.value, aten.scatter.reduce, aten.scatter.value_reduce, aten.scatter_reduce,
    aten.scatter_.value, aten.scatter_.reduce, aten.scatter_.value_reduce, aten.scatter_reduce_,
)(_scatter_splits)


@register(aten.scatter.src, aten.scatter_.src, aten.scatter_add, aten.scatter_add_)
def scatter_src(ctx: OpContext) -> Iterator[OpStrategy]:
    """Writing or adding ``src`` is linear in ``x`` and ``src`` together: ``P, R, P -> P``."""
    yield from _scatter_splits(ctx)
    yield OpStrategy((P, R, P), P)


def _index_dim_splits(ctx: OpContext) -> Iterator[OpStrategy]:
    """``index_add(x, dim, index, source)`` and kin: the 1-D ``index`` picks slices of ``x`` along
    ``dim``; ``source`` has x's size in every other dim, which may be split on both (``index`` and a
    0-dim fill value whole)."""
    x = ctx.inputs[0]
    dim = norm_dim(ctx.arg(1, "dim"), x.ndim)
    for d in range(x.ndim):
        if d != dim:
            others = tuple(Shard(d) if m.ndim == x.ndim and m.shape[d] == x.shape[d] else R for m in ctx.inputs[1:])
            yield OpStrategy((Shard(d),) + others, Shard(d))


register(aten.index_fill, aten.index_fill_, aten.index_reduce, aten.index_reduce_)(_index_dim_splits)


@register(aten.index_add, aten.index_add_, aten.index_copy, aten.index_copy_)
def index_add(ctx: OpContext) -> Iterator[OpStrategy]:
    """Adding or copying ``source`` is linear in ``x`` and ``source`` together: ``P, R, P -> P``."""
    yield from _index_dim_splits(ctx)
    yield OpStrategy((P, R, P), P)


@register(aten.index_put, aten.index_put_)
def index_put(ctx: OpContext) -> Iterator[OpStrategy]:
    """``x[indices] = values``: ``values`` broadcasts to the shape of ``x[indices]`` (see ``index``).
    An unindexed dim of ``x`` may be split with the dim of ``values`` it meets (``values`` whole
    where it broadcasts along it); the indices stay whole. Writing or accumulating is linear in
    ``x`` and ``values`` together: ``P, R.., P -> P``."""
    x, *idx_metas, values = ctx.inputs
    indices = ctx.arg(1, "indices")
    indexed = [d for d, a in enumerate(indices) if isinstance(a, fx.Node)]
    n_idx = len(idx_metas)
    if indexed and len(indexed) == n_idx and not any(m.dtype in (torch.bool, torch.uint8) for m in idx_metas):
        b_ndim = max(m.ndim for m in idx_metas)
        rest_out, _ = index_layout(x.ndim, indexed, b_ndim)
        out_ndim = len(rest_out) + b_ndim
        for d, e in rest_out.items():
            ev = e - (out_ndim - values.ndim)
            if ev < 0 or values.shape[ev] == 1:
                yield OpStrategy((Shard(d),) + (R,) * n_idx + (R,), Shard(d))
            elif values.shape[ev] == x.shape[d]:
                yield OpStrategy((Shard(d),) + (R,) * n_idx + (Shard(ev),), Shard(d))
    yield OpStrategy((P,) + (R,) * n_idx + (P,), P)


@register(aten.masked_scatter, aten.masked_scatter_)
def masked_scatter(ctx: OpContext) -> Iterator[OpStrategy]:
    """``source`` is read in order over every True of the mask, so no dim splits; writing it is
    linear in ``x`` and ``source`` together: ``P, R, P -> P``."""
    yield OpStrategy((P, R, P), P)


@register(aten.bucketize.Tensor)
def bucketize(ctx: OpContext) -> Iterator[OpStrategy]:
    """Each element is looked up alone in the whole (replicated) boundaries."""
    for d in range(ctx.inputs[0].ndim):
        yield OpStrategy((Shard(d), R), Shard(d))


@register(aten.searchsorted.Tensor)
def searchsorted(ctx: OpContext) -> Iterator[OpStrategy]:
    """``searchsorted(seq, x, sorter=)``: a 1-D ``seq`` (and ``sorter``) stays whole and any dim of
    ``x`` may be split; an N-D ``seq`` holds one sequence per leading index of ``x``, so a
    leading dim splits both."""
    seq, x, *sorter = ctx.inputs
    for d in range(x.ndim):
        if seq.ndim == 1:
            yield OpStrategy((R, Shard(d)) + (R,) * len(sorter), Shard(d))
        elif d < x.ndim - 1:
            yield OpStrategy((Shard(d), Shard(d)) + (Shard(d),) * len(sorter), Shard(d))
