"""In-place fills and copies models use (``fill_``, ``zero_``, ``masked_fill_``, ``copy_``).

The written tensor keeps its placement: each rank fills or copies into its own chunk, with the
other operands split alike or broadcast (as pointwise ops, ``autotp.strategies.rules.pointwise``).
Zeroing is linear (``P -> P``) and so is overwriting with a partial source (``copy_(P, P) -> P``);
a fill with a value is not (every rank would hold the value). Graph writes stay replicated anyway
(``autotp.strategies.mutation``); these strategies are what a write checked alone allows.
"""
from __future__ import annotations

from collections.abc import Iterator

from autotp.ir.placement import P
from autotp.strategies.rules.pointwise import broadcast_strategies
from autotp.strategies.rules.registry import OpContext, OpStrategy, register

aten = __import__("torch").ops.aten

register(aten.fill_, aten.masked_fill_)(broadcast_strategies)


@register(aten.zero_, aten.copy_)
def overwrite(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from broadcast_strategies(ctx)
    yield OpStrategy((P,) * len(ctx.inputs), P)
