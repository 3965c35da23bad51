"""Group, batch and instance norm on ``x[N, C, *s]`` (layer norm and RMS norm live in reduction.py).

Group norm normalises each (sample, group) over the group's channels and the spatial dims: a
batch split keeps every group whole, and so does a channel split into whole groups (``tp``
divides the group count; each rank normalises ``G / tp`` groups with its chunk of weight and
bias). Batch norm normalises each channel: in training over the batch and spatial dims, so only
channels may be split (per-channel weight, bias and statistics with them); in eval it is a fixed
per-channel affine map, so any dim may be split with the statistics whole there. A node whose
training step writes the running statistics in place runs replicated whatever this rule offers
(autotp/strategies/mutation.py). Instance norm normalises each (sample, channel) over the
spatial dims: batch and channels may be split; with running statistics in place of the input's
(``use_input_stats=False``) it is a fixed affine map like batch norm in eval.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import fx

from autotp.ir.placement import Placement, R, Shard
from autotp.strategies.rules.conv import count_divides, divide_arg
from autotp.strategies.rules.registry import LocalContext, OpContext, OpStrategy, register

aten = torch.ops.aten


def _splits_channels(strategy: OpStrategy) -> bool:
    return strategy.inputs[0] == Shard(1)


def _localize_groups(args: tuple[Any, ...], kwargs: dict[str, Any], lc: LocalContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """group_norm(x, num_groups, ...): a channel split runs ``num_groups / tp`` groups per rank."""
    if _splits_channels(lc.strategy):
        return divide_arg(args, kwargs, index=1, name="num_groups", by=lc.tp_size)
    return args, kwargs


@register(aten.group_norm, localize=_localize_groups, combinable=count_divides(index=1, name="num_groups", splits=_splits_channels))
def group_norm(ctx: OpContext) -> Iterator[OpStrategy]:
    """group_norm(x, num_groups, weight=None, bias=None, eps, cudnn_enabled)."""
    params = len(ctx.inputs) - 1
    yield OpStrategy((Shard(0),) + (R,) * params, Shard(0))
    if ctx.arg(1, "num_groups") % ctx.tp_size == 0:
        yield OpStrategy((Shard(1),) + (Shard(0),) * params, Shard(1))


def _localize_native_group_norm(args: tuple[Any, ...], kwargs: dict[str, Any], lc: LocalContext) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """native_group_norm(x, weight, bias, N, C, HxW, group, eps): the counts become this rank's."""
    if lc.strategy.inputs[0] == Shard(0):
        return divide_arg(args, kwargs, index=3, name="N", by=lc.tp_size)
    args, kwargs = divide_arg(args, kwargs, index=4, name="C", by=lc.tp_size)
    return divide_arg(args, kwargs, index=6, name="group", by=lc.tp_size)


@register(aten.native_group_norm, localize=_localize_native_group_norm, combinable=count_divides(index=6, name="group", splits=_splits_channels))
def native_group_norm(ctx: OpContext) -> Iterator[OpStrategy]:
    """Returns (out, mean[N, G], rstd[N, G]): they split with the batch, or with the groups."""
    params = len(ctx.inputs) - 1
    yield OpStrategy((Shard(0),) + (R,) * params, (Shard(0),) * 3)
    if ctx.arg(6, "group") % ctx.tp_size == 0:
        yield OpStrategy((Shard(1),) + (Shard(0),) * params, (Shard(1),) * 3)


# Batch norm overloads and whether they normalise with batch statistics when no ``training``
# argument says so (``None``: the op has one).
_BATCH_NORM_TRAINING: dict[Any, bool | None] = {
    aten.batch_norm: None,
    aten.native_batch_norm: None,
    aten._native_batch_norm_legit: None,
    aten._native_batch_norm_legit_functional: None,
    aten._native_batch_norm_legit_no_training: False,
    aten._batch_norm_with_update: True,
    aten._batch_norm_no_update: False,
}


@register(*_BATCH_NORM_TRAINING)
def batch_norm(ctx: OpContext) -> Iterator[OpStrategy]:
    """Every tensor after x is per channel (weight, bias, running statistics). Extra outputs are
    saved or updated statistics of shape (C,), or empty buffers (eval, CPU) that stay whole."""
    x = ctx.inputs[0]
    params = len(ctx.inputs) - 1
    packet = ctx.node.target.overloadpacket  # type: ignore[union-attr]  # an OpOverload
    default = _BATCH_NORM_TRAINING[packet]
    training = bool(ctx.named_arg("training", default)) if default is None else default
    stats = all(isinstance(ctx.named_arg(name), fx.Node) for name in ("running_mean", "running_var"))
    extra = ctx.output[1:] if isinstance(ctx.output, tuple) else None

    def out(main: Placement, per_channel: Placement) -> Placement | tuple[Placement, ...]:
        if extra is None:
            return main
        return (main,) + tuple(per_channel if m.shape == (x.shape[1],) else R for m in extra)

    yield OpStrategy((Shard(1),) + (Shard(0),) * params, out(Shard(1), Shard(0)))
    if not training and stats:  # a fixed affine map per channel
        for d in range(x.ndim):
            if d != 1:
                yield OpStrategy((Shard(d),) + (R,) * params, out(Shard(d), R))


@register(aten.instance_norm)
def instance_norm(ctx: OpContext) -> Iterator[OpStrategy]:
    """instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled)."""
    x = ctx.inputs[0]
    params = len(ctx.inputs) - 1
    yield OpStrategy((Shard(1),) + (Shard(0),) * params, Shard(1))
    fixed = not ctx.arg(5, "use_input_stats")
    for d in range(x.ndim):
        if d == 0 or (d != 1 and fixed):
            yield OpStrategy((Shard(d),) + (R,) * params, Shard(d))
