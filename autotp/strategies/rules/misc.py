"""Constructors (arange, full, zeros, new_ones, new_empty_strided...) and small leftovers (outer).

A constructor has no tensor input, so any output dim may be split: each rank builds only its
chunk. Size arguments become the local size; ``arange`` also shifts its start by the chunk's
offset (rank ``r`` of 4 building ``arange(16)`` makes ``arange(4r, 4r + 4)``).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from autotp.ir.placement import Shard
from autotp.strategies.rules.matmul import einsum_strategies
from autotp.strategies.rules.registry import LocalContext, OpContext, OpStrategy, register
from autotp.strategies.rules.view import local_shape, localize_size

aten = __import__("torch").ops.aten


def constructor(ctx: OpContext) -> Iterator[OpStrategy]:
    for d in range(ctx.output.ndim):  # type: ignore[union-attr]  # a single-output op
        yield OpStrategy((), Shard(d))


register(aten.full, aten.zeros, aten.ones, aten.empty, aten.rand, aten.randn, localize=localize_size(0, "size"))(constructor)
register(
    aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty,
    localize=localize_size(1, "size"), metadata_args=(0,),
)(constructor)


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def _localize_empty_strided(args: tuple[Any, ...], kwargs: dict[str, Any], lc: LocalContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
    size = local_shape(lc.output.shape, lc.strategy.output, lc.tp_size)  # type: ignore[arg-type, union-attr]  # a single-output op
    return (args[0], size, _contiguous_strides(size)) + tuple(args[3:]), kwargs


@register(aten.new_empty_strided, localize=_localize_empty_strided, metadata_args=(0,))
def new_empty_strided(ctx: OpContext) -> Iterator[OpStrategy]:
    """Uninitialised memory of a given size and stride: split like a constructor when the stride
    is the size's contiguous one, which the local chunk's contiguous stride then replaces (any
    other layout would need its strides re-derived per chunk, so it runs replicated)."""
    if list(ctx.arg(2, "stride")) == _contiguous_strides(list(ctx.arg(1, "size"))):
        yield from constructor(ctx)


def _localize_arange(args: tuple[Any, ...], kwargs: dict[str, Any], lc: LocalContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """arange(end) / arange(start, end) / arange(start, end, step) -> this rank's chunk."""
    if len(args) == 1:  # the end is implied by the output size
        start, step = 0, 1
    else:
        start = args[0]
        step = args[2] if len(args) > 2 else kwargs.get("step", 1)
    chunk = lc.output.shape[0] // lc.tp_size  # type: ignore[union-attr]  # a single-output op
    local_start = start + lc.rank * chunk * step
    kwargs = {k: v for k, v in kwargs.items() if k != "step"}
    # the end half a step past the last element: a float end computed as start + chunk*step can
    # land just above it and add an element (arange(0.0, 0.6000000000000001, 0.1) has 7)
    local_end = local_start + chunk * step if isinstance(step, int) and isinstance(start, int) else local_start + (chunk - 0.5) * step
    return (local_start, local_end, step), kwargs


@register(aten.arange, localize=_localize_arange)
def arange(ctx: OpContext) -> Iterator[OpStrategy]:
    yield OpStrategy((), Shard(0))


@register(aten.outer)
def outer(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from einsum_strategies(["a", "b"], "ab", ctx.inputs)
