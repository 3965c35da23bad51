"""Embedding lookup ``weight[V, C][ids]``.

Splitting C (weight ``S(1)``) gives each rank a slice of every row: output ``S(-1)``.
Splitting the ids (any dim) with the table replicated gives a data-parallel lookup.
"""
from __future__ import annotations

from collections.abc import Iterator

from autotp.placement import R, Shard
from autotp.rules.registry import OpContext, OpStrategy, register

aten = __import__("torch").ops.aten


@register(aten.embedding)
def embedding(ctx: OpContext) -> Iterator[OpStrategy]:
    weight, ids = ctx.inputs[0], ctx.inputs[1]
    yield OpStrategy((Shard(1), R), Shard(ids.ndim))
    for d in range(ids.ndim):
        yield OpStrategy((R, Shard(d)), Shard(d))
