"""Random ops: the output is drawn elementwise from (or shaped like) the input, so it splits like it.

A split output draws each chunk from this rank's own stream (the rewriter routes any op tagged
``torch.Tag.nondeterministic_seeded`` whose output is split through
``autotp.rewrite.random.run_in_sharded_stream``), so chunks are independent draws, as the
unsharded tensor's parts are. No partial sum: a draw is not linear in its parameters.
"""
from __future__ import annotations

from collections.abc import Iterator

from autotp.ir.placement import Shard
from autotp.strategies.rules.pointwise import broadcast_strategies
from autotp.strategies.rules.registry import OpContext, OpStrategy, register

aten = __import__("torch").ops.aten


@register(
    aten.randn_like, aten.rand_like, aten.randint_like, aten.bernoulli.default, aten.bernoulli.p,
    aten.normal.Tensor_float, aten.normal.float_Tensor, aten.normal.Tensor_Tensor,
)
def draw_like(ctx: OpContext) -> Iterator[OpStrategy]:
    """Shaped like (or with parameters elementwise from) the tensor inputs, broadcast alike;
    ``randint_like.Tensor``'s 0-d bound stays replicated."""
    yield from broadcast_strategies(ctx)


@register(aten.multinomial)
def multinomial(ctx: OpContext) -> Iterator[OpStrategy]:
    """``[B, C]`` probabilities -> ``[B, num_samples]`` draws: rows are independent, so the batch
    dim splits; the category dim stays whole (each draw normalises over its whole row)."""
    if ctx.inputs[0].ndim == 2:
        yield OpStrategy((Shard(0),), Shard(0))

