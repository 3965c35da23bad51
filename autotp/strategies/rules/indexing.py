"""Indexing with tensors: advanced indexing ``x[idx0, :, idx2]`` and ``gather``.

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
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import fx

from autotp.ir.placement import P, Placement, R, Shard
from autotp.strategies.rules.registry import OpContext, OpStrategy, norm_dim, register

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
