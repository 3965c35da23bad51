"""Convolution, pooling, upsampling, padding, grid sampling and ``repeat_interleave``.

These ops slide a window over (or resample) the trailing spatial dims, so a spatial split would
need a halo exchange with the neighbouring ranks: it is never offered. The dims in front of the
spatial ones (batch, channels; an unbatched input ``(C, H, W)`` has channels only) are
independent::

    conv   x[N, C_in, *s] * w[C_out, C_in/g, *k] + b[C_out] -> [N, C_out, *s']
      batch:           x S(0), w R, b R        -> S(0)
      out channels:    x R, w S(0), b S(0)     -> S(1)       (g == 1)
      in channels:     x S(1), w S(1), b P     -> P          (g == 1: each rank sums its channels)
      groups:          x S(1), w S(0), b S(0)  -> S(1)       (tp divides g; each rank runs g/tp groups)

Transposed convolutions store ``w[C_in, C_out/g, *k]``: the roles of the weight's dims swap.
Stride, padding and dilation act on the spatial dims only, so they do not change these splits.
Pooling and upsampling split any leading dim; average pooling, interpolation, padding with zeros
(or copies of the input) and ``repeat_interleave`` are linear, so ``P`` passes through them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx

from autotp.ir.placement import P, Placement, R, Shard
from autotp.strategies.rules.registry import (
    CombinableFn,
    LocalContext,
    LocalizeFn,
    OpContext,
    OpStrategy,
    arg_of,
    norm_dim,
    register,
    with_arg,
)

aten = torch.ops.aten


def divide_arg(args: tuple[Any, ...], kwargs: dict[str, Any], *, index: int, name: str, by: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A count argument (groups, batch size) divided by ``by``: this rank's share."""
    return with_arg(args, kwargs, index=index, name=name, value=arg_of(args, kwargs, index=index, name=name, default=1) // by)


def localize_count(*, index: int, name: str, default: int = 1) -> LocalizeFn:
    """Divide a count argument (``groups``) by the axis size when the strategy splits the output's
    channel dim: each rank then runs its ``groups / tp`` whole groups."""

    def localize(args: tuple[Any, ...], kwargs: dict[str, Any], lc: LocalContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
        count = arg_of(args, kwargs, index=index, name=name, default=default)
        if count == 1 or not isinstance(lc.strategy.inputs[0], Shard) or lc.strategy.inputs[0].dim != _channel_dim(lc):
            return args, kwargs
        return divide_arg(args, kwargs, index=index, name=name, by=lc.tp_size)

    return localize


def count_divides(*, index: int, name: str, splits: Callable[[OpStrategy], bool], default: int = 1) -> CombinableFn:
    """The axes whose answer ``splits`` the count argument (``groups``) together must divide it:
    6 groups on a (2, 2) mesh would leave each rank one and a half. A count of 1 is never split
    (a conv with ``groups == 1`` splits its output channels instead)."""

    def combinable(node: fx.Node, axes: tuple[OpStrategy, ...], mesh_shape: tuple[int, ...]) -> bool:
        count = arg_of(tuple(node.args), dict(node.kwargs), index=index, name=name, default=default)
        return count == 1 or count % math.prod(size for size, axis in zip(mesh_shape, axes) if splits(axis)) == 0

    return combinable


def _splits_groups(strategy: OpStrategy) -> bool:
    """A grouped conv's only strategy with the weight split on dim 0 is the split into groups."""
    return strategy.inputs[1] == Shard(0) and isinstance(strategy.output, Shard)


def _channel_dim(lc: LocalContext) -> int:
    x, w = lc.inputs[0], lc.inputs[1]
    return x.ndim - (w.ndim - 1)


def _conv_strategies(ctx: OpContext, *, transposed: bool, groups: int) -> Iterator[OpStrategy]:
    x, w = ctx.inputs[0], ctx.inputs[1]
    has_bias = len(ctx.inputs) == 3
    channel = x.ndim - (w.ndim - 1)  # 1 when batched, 0 for an unbatched (C, *s) input

    def slots(xp: Placement, wp: Placement, bp: Placement) -> tuple[Placement, ...]:
        return (xp, wp, bp) if has_bias else (xp, wp)

    out_w, in_w = (1, 0) if transposed else (0, 1)
    if channel == 1:
        yield OpStrategy(slots(Shard(0), R, R), Shard(0))
    if groups == 1:
        yield OpStrategy(slots(R, Shard(out_w), Shard(0)), Shard(channel))
        yield OpStrategy(slots(Shard(channel), Shard(in_w), P), P)
    elif groups % ctx.tp_size == 0:  # whole groups per rank: a group's weight rows lead in dim 0
        yield OpStrategy(slots(Shard(channel), Shard(0), Shard(0)), Shard(channel))
    yield OpStrategy(slots(P, R, P), P)
    yield OpStrategy(slots(R, P, P), P)


_GROUPS_AT_6 = (aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)


@register(*_GROUPS_AT_6, localize=localize_count(index=6, name="groups"), combinable=count_divides(index=6, name="groups", splits=_splits_groups))
def conv(ctx: OpContext) -> Iterator[OpStrategy]:
    transposed = ctx.node.target.overloadpacket not in (aten.conv1d, aten.conv2d, aten.conv3d)  # type: ignore[union-attr]  # an OpOverload
    yield from _conv_strategies(ctx, transposed=transposed, groups=int(ctx.arg(6, "groups", 1)))


@register(aten.convolution, localize=localize_count(index=8, name="groups"), combinable=count_divides(index=8, name="groups", splits=_splits_groups))
def convolution(ctx: OpContext) -> Iterator[OpStrategy]:
    """convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)."""
    yield from _conv_strategies(ctx, transposed=bool(ctx.arg(6, "transposed")), groups=int(ctx.arg(8, "groups")))


def leading_dims(ctx: OpContext, spatial: int, *, linear: bool) -> Iterator[OpStrategy]:
    """Split any dim in front of the ``spatial`` trailing ones, on every output alike."""
    x = ctx.inputs[0]
    n_out = len(ctx.output) if isinstance(ctx.output, tuple) else 0
    for d in range(x.ndim - spatial):
        yield OpStrategy((Shard(d),), (Shard(d),) * n_out if n_out else Shard(d))
    if linear:
        yield OpStrategy((P,), P)


def _register_leading(spatial: int, ops: Sequence[Any], *, linear: bool) -> None:
    def rule(ctx: OpContext) -> Iterator[OpStrategy]:
        yield from leading_dims(ctx, spatial, linear=linear)

    register(*(op for op in ops if op is not None))(rule)


def _ops(*names: str) -> list[Any]:
    """The aten packets of ``names`` this torch build has (private upsampling variants come and go)."""
    return [getattr(aten, name) for name in names if hasattr(aten, name)]


for _k in (1, 2, 3):
    # max pooling picks an element: not linear. Its indices count within one spatial plane, so
    # batch/channel splits keep them right.
    _register_leading(_k, _ops(f"max_pool{_k}d", f"max_pool{_k}d_with_indices", f"adaptive_max_pool{_k}d"), linear=False)
    _register_leading(_k, _ops(
        f"avg_pool{_k}d", f"adaptive_avg_pool{_k}d", f"_adaptive_avg_pool{_k}d",
        f"upsample_nearest{_k}d", f"_upsample_nearest_exact{_k}d",
    ), linear=True)
_register_leading(1, _ops("upsample_linear1d"), linear=True)
_register_leading(2, _ops("upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_bicubic2d", "_upsample_bicubic2d_aa"), linear=True)
_register_leading(3, _ops("upsample_trilinear3d"), linear=True)


def _unpadded_dims(ndim: int, pad: Sequence[int]) -> list[int]:
    """Dims whose pad pair is (0, 0); ``pad`` lists pairs from the last dim backwards."""
    padded = {ndim - 1 - i for i in range(len(pad) // 2) if pad[2 * i] != 0 or pad[2 * i + 1] != 0}
    return [d for d in range(ndim) if d not in padded]


def _pad_strategies(ctx: OpContext, pad: Sequence[int], *, linear: bool) -> Iterator[OpStrategy]:
    for d in _unpadded_dims(ctx.inputs[0].ndim, pad):
        yield OpStrategy((Shard(d),), Shard(d))
    if linear:
        yield OpStrategy((P,), P)


@register(aten.pad)
def pad(ctx: OpContext) -> Iterator[OpStrategy]:
    """pad(x, pad, mode='constant', value=None): copies of x and a constant; linear unless the constant is not 0."""
    mode = ctx.arg(2, "mode", "constant")
    yield from _pad_strategies(ctx, ctx.arg(1, "pad"), linear=mode != "constant" or not ctx.arg(3, "value"))


@register(aten.constant_pad_nd)
def constant_pad_nd(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from _pad_strategies(ctx, ctx.arg(1, "pad"), linear=not ctx.arg(2, "value", 0))


@register(*_ops(*(f"{kind}_pad{k}d" for kind in ("reflection", "replication") for k in (1, 2, 3)), "_pad_circular"))
def copy_pad(ctx: OpContext) -> Iterator[OpStrategy]:
    """Reflection, replication and circular padding fill the border with copies of x: linear."""
    yield from _pad_strategies(ctx, ctx.arg(1, "padding" if ctx.node.target.overloadpacket is not aten._pad_circular else "pad"), linear=True)  # type: ignore[union-attr]  # an OpOverload


@register(aten.grid_sampler, aten.grid_sampler_2d, aten.grid_sampler_3d)
def grid_sampler(ctx: OpContext) -> Iterator[OpStrategy]:
    """out[n, c, *p] samples x[n, c] at grid[n, *p]: batch, channels (grid whole) and the grid's
    output positions (x whole) are independent; linear in x."""
    grid = ctx.inputs[1]
    yield OpStrategy((Shard(0), Shard(0)), Shard(0))
    yield OpStrategy((Shard(1), R), Shard(1))
    for d in range(1, grid.ndim - 1):
        yield OpStrategy((R, Shard(d)), Shard(d + 1))
    yield OpStrategy((P, R), P)


@register(aten.repeat_interleave)
def repeat_interleave(ctx: OpContext) -> Iterator[OpStrategy]:
    """Repeats along ``dim``; any other dim keeps its split, and so does ``dim`` for an int number
    of repeats. Without ``dim`` the input is flattened
    first (no split survives), and ``repeat_interleave(repeats)`` makes indices (not offered)."""
    target = ctx.node.target
    if target is aten.repeat_interleave.Tensor or ctx.arg(2, "dim") is None:
        return
    val = ctx.node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.shape):
        return  # a data-dependent length (tensor repeats, no output_size)
    x = ctx.inputs[0]
    dim = norm_dim(ctx.arg(2, "dim"), x.ndim)
    rest = (R,) * (len(ctx.inputs) - 1)  # a tensor of repeats stays whole
    for d in range(x.ndim):
        if d != dim:
            yield OpStrategy((Shard(d),) + rest, Shard(d))
    if target is aten.repeat_interleave.self_int and ctx.named_arg("output_size") is None:
        # each element's copies sit next to each other: an even chunk of the input repeats into
        # the same chunk of the output (the engine offers it only where the input dim divides)
        yield OpStrategy((Shard(dim),), Shard(dim))
    yield OpStrategy((P,) + rest, P)
