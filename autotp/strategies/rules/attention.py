"""``scaled_dot_product_attention(q, k, v, attn_mask=None, ...)`` on ``(*batch, L, E)`` inputs.

Only the last two dims (sequence, features) mix: every dim before them is batch-like (3-D
``(N, L, E)``: dim 0; 4-D ``(B, heads, L, E)``: dims 0 and 1; 5-D: 0, 1, 2) and may be split on
every input that has it at the output's size. An input broadcast along it (a size-1 or missing
dim of k, v or the mask, right-aligned as in broadcasting) stays ``R``. With ``enable_gqa`` the
heads dim (``-3``) of k/v may be smaller than q's: query head ``i`` reads kv head ``i // group``,
so splitting both head counts into ``tp_size`` chunks keeps every query head with its kv head
(the engine's divisibility check makes ``tp_size`` divide both). Splitting the query sequence
(q ``S(-2)``, k/v ``R``) is offered only without a causal mask: a causal mask for a query chunk
would need the chunk's offset.
"""
from __future__ import annotations

from collections.abc import Iterator

from autotp.ir.placement import Placement, R, Shard
from autotp.ir.values import TensorMeta
from autotp.strategies.rules.registry import OpContext, OpStrategy, register

aten = __import__("torch").ops.aten


@register(aten.scaled_dot_product_attention)
def sdpa(ctx: OpContext) -> Iterator[OpStrategy]:
    q, out = ctx.inputs[0], ctx.output
    if not isinstance(out, TensorMeta):  # a single-output op
        return
    ndim = out.ndim
    gqa = bool(ctx.named_arg("enable_gqa", False))

    def batch_like(meta: TensorMeta, dim: int, *, grouped: bool) -> Placement | None:
        """``meta``'s placement when output dim ``dim`` (before the last two) is split; None: no split."""
        md = dim - (ndim - meta.ndim)
        if md < 0 or meta.shape[md] == 1:
            return R  # broadcast along the dim
        if meta.shape[md] == out.shape[dim]:
            return Shard(md)
        fewer_heads = grouped and dim == ndim - 3 and out.shape[dim] % meta.shape[md] == 0
        return Shard(md) if fewer_heads else None

    for dim in range(ndim - 2):
        placements = [batch_like(meta, dim, grouped=gqa and i in (1, 2)) for i, meta in enumerate(ctx.inputs)]
        if all(p is not None for p in placements):
            yield OpStrategy(tuple(placements), Shard(dim))  # type: ignore[arg-type]  # None ruled out above
    if not ctx.arg(5, "is_causal", False):
        mask: tuple[Placement, ...] = ()
        if len(ctx.inputs) > 3:
            m = ctx.inputs[3]
            mask = (Shard(m.ndim - 2) if m.ndim >= 2 and m.shape[-2] == out.shape[-2] else R,)
        yield OpStrategy((Shard(q.ndim - 2), R, R) + mask, Shard(ndim - 2))
