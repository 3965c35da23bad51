"""``scaled_dot_product_attention(q, k, v, attn_mask=None, ...)`` on (B, heads, T, head_dim).

Batch and heads are independent: split either on q, k, v (and the mask where it has that dim).
With grouped-query attention (fewer KV heads) splitting heads keeps the grouping as long as
``tp_size`` divides both head counts, which the engine's divisibility check ensures. Splitting
the query sequence (q ``S(2)``, k/v ``R``) is offered only without a causal mask: a causal
mask for a query chunk would need the chunk's offset.
"""
from __future__ import annotations

from collections.abc import Iterator

from autotp.ir.placement import Placement, R, Shard
from autotp.strategies.rules.registry import OpContext, OpStrategy, register

aten = __import__("torch").ops.aten


@register(aten.scaled_dot_product_attention)
def sdpa(ctx: OpContext) -> Iterator[OpStrategy]:
    q = ctx.inputs[0]
    mask = ctx.inputs[3] if len(ctx.inputs) > 3 else None
    out = ctx.output

    def mask_placement(dim: int) -> tuple[Placement, ...]:
        if mask is None:
            return ()
        md = dim - (out.ndim - mask.ndim)  # type: ignore[union-attr]  # a single-output op
        return (Shard(md) if md >= 0 and mask.shape[md] == out.shape[dim] else R,)  # type: ignore[union-attr]  # a single-output op

    for dim in (0, 1):
        yield OpStrategy((Shard(dim),) * 3 + mask_placement(dim), Shard(dim))
    if not ctx.arg(5, "is_causal", False):
        seq = q.ndim - 2
        yield OpStrategy((Shard(seq), R, R) + mask_placement(seq), Shard(seq))
