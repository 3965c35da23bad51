"""Losses: cross-entropy with the classes split (vocab-parallel), or with the batch split.

With logits split on the class dim (an LM head split on the vocabulary), the loss is computed
without gathering the logits by ``autotp.comm.ops.vocab_parallel_cross_entropy``: three all-reduces of
one value per row, priced here. With the batch split, ``reduction='none'`` keeps the split and
``'sum'`` leaves each rank a partial sum; ``'mean'`` over a split batch is not offered (with
ignored targets each chunk's count differs).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from autotp.comm.ops import vocab_parallel_cross_entropy
from autotp.ir.placement import P, R, Shard
from autotp.ir.values import TensorMeta
from autotp.strategies.rules.registry import OpContext, OpStrategy, OutputMeta, register

aten = __import__("torch").ops.aten

_NONE, _MEAN, _SUM = 0, 1, 2


def _class_dim(logits: TensorMeta) -> int:
    return 1 if logits.ndim > 1 else 0


def _is_vocab_parallel(strategy: OpStrategy) -> bool:
    return isinstance(strategy.inputs[0], Shard) and strategy.inputs[1] == R and strategy.output == R


def _local(strategy: OpStrategy) -> Callable[..., Any] | None:
    return vocab_parallel_cross_entropy if _is_vocab_parallel(strategy) else None


def _collectives(strategy: OpStrategy, inputs: tuple[TensorMeta, ...], output: OutputMeta) -> tuple[tuple[str, int], ...]:
    if not _is_vocab_parallel(strategy):
        return ()
    logits, target = inputs[0], inputs[1]
    row_nbytes = target.numel * logits.dtype.itemsize  # one value per row: max, sum of exp, target logit
    return (("all_reduce", row_nbytes),) * 3


@register(aten.cross_entropy_loss, local_impl=_local, internal_collectives=_collectives)
def cross_entropy(ctx: OpContext) -> Iterator[OpStrategy]:
    logits, target = ctx.inputs[0], ctx.inputs[1]
    if len(ctx.inputs) > 2 or ctx.named_arg("label_smoothing", 0.0) or target.dtype.is_floating_point:
        return  # class weights, label smoothing or soft targets: replicated only
    reduction = ctx.named_arg("reduction", _MEAN)
    yield OpStrategy((Shard(_class_dim(logits)), R), R)
    if logits.ndim > 1 and reduction == _NONE:
        yield OpStrategy((Shard(0), Shard(0)), Shard(0))
    if logits.ndim > 1 and reduction == _SUM:
        yield OpStrategy((Shard(0), Shard(0)), P)
