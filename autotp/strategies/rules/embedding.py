"""Embedding lookup ``weight[V, C][ids]``.

Splitting C (weight ``S(1)``) gives each rank a slice of every row: output ``S(-1)``.
Splitting the ids (any dim) with the table replicated gives a data-parallel lookup.
Splitting V (weight ``S(0)``) is Megatron-LM's vocab-parallel embedding: each rank looks up the
ids in its range and zeros the rest, so the output is a partial sum (``P``).

``scale_grad_by_freq`` divides each row's gradient by how often its id occurs in the whole
batch: a rank that sees only part of the ids (split ids) or folds the ids outside its vocabulary
range onto a clamped row (split V) would count wrongly, so only the C split is offered with it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from autotp.comm.ops import vocab_parallel_embedding
from autotp.ir.placement import P, R, Shard
from autotp.strategies.rules.registry import OpContext, OpStrategy, register

aten = __import__("torch").ops.aten


VOCAB_PARALLEL = OpStrategy((Shard(0), R), P)


def _local_embedding(strategy: OpStrategy) -> Callable[..., Any] | None:
    return vocab_parallel_embedding if strategy == VOCAB_PARALLEL else None


@register(aten.embedding, local_impl=_local_embedding)
def embedding(ctx: OpContext) -> Iterator[OpStrategy]:
    ids = ctx.inputs[1]
    yield OpStrategy((Shard(1), R), Shard(ids.ndim))
    if ctx.named_arg("scale_grad_by_freq", False):
        return
    yield VOCAB_PARALLEL
    for d in range(ids.ndim):
        yield OpStrategy((R, Shard(d)), Shard(d))
