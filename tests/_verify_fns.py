"""Rewrite bugs for ``tests/test_verify.py``: each mutates a rank-local graph the way a buggy
rewriter would. Module-level, since ``autotp.verify`` pickles its ``graph_hook`` to the ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from autotp.comm import collectives


def _calls(gm: fx.GraphModule, target: object) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _blocking(gm: fx.GraphModule) -> None:
    """Every started collective made blocking (its ``wait`` removed), so a hook can rewrite it as one call."""
    for wait in _calls(gm, collectives.wait):
        start = wait.args[0]
        start.kwargs = {}  # type: ignore[union-attr]
        wait.replace_all_uses_with(start)  # type: ignore[arg-type]
        gm.graph.erase_node(wait)


def linears_without_grad_sync(x: torch.Tensor, linears: tuple[tuple[torch.Tensor, torch.Tensor | None], ...], group_name: str) -> tuple[torch.Tensor, ...]:
    return tuple(F.linear(x, w, b) for w, b in linears)


def drop_backward_all_reduce(gm: fx.GraphModule, rank: int) -> None:
    """``grad_all_reduce`` dropped: the gradient of a replicated input of split compute stays a
    partial sum (also the one fused linears run in backward)."""
    for node in _calls(gm, collectives.grad_all_reduce):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    for node in _calls(gm, collectives.linears_with_grad_sync):
        node.target = linears_without_grad_sync


def drop_partial_sum_reduction(gm: fx.GraphModule, rank: int) -> None:
    """The forward ``all_reduce`` after a row-parallel matmul dropped: each rank keeps its partial sum."""
    _blocking(gm)
    for node in _calls(gm, collectives.all_reduce):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)


def all_reduce_as_reduce_scatter(gm: fx.GraphModule, rank: int, *, scatter_dim: int = 1) -> None:
    """Each ``all_reduce`` lowered to ``all_gather(reduce_scatter(x, scatter_dim), 1)`` (Megatron's
    sequence-parallel pair); with ``scatter_dim == 1`` this is correct."""
    _blocking(gm)
    for node in _calls(gm, collectives.all_reduce):
        x, group = node.args
        with gm.graph.inserting_after(node):
            scattered = gm.graph.call_function(collectives.reduce_scatter, (x, scatter_dim, group))
        with gm.graph.inserting_after(scattered):
            gathered = gm.graph.call_function(collectives.all_gather, (scattered, 1, group))
        node.replace_all_uses_with(gathered)
        gm.graph.erase_node(node)


def correct_reduce_scatter(gm: fx.GraphModule, rank: int) -> None:
    all_reduce_as_reduce_scatter(gm, rank, scatter_dim=1)


def wrong_reduce_scatter_dim(gm: fx.GraphModule, rank: int) -> None:
    """The reduce-scatter on the last dim while the all-gather restores dim 1."""
    all_reduce_as_reduce_scatter(gm, rank, scatter_dim=-1)


def swap_halves(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat(x.chunk(2, dim=dim)[::-1], dim=dim)


def swap_gathered_shard_order(gm: fx.GraphModule, rank: int) -> None:
    """Every ``all_gather`` concatenates the ranks' chunks in the wrong order (2 ranks: swapped)."""
    _blocking(gm)
    for node in _calls(gm, collectives.all_gather):
        with gm.graph.inserting_after(node):
            swapped = gm.graph.call_function(swap_halves, (node, node.args[1]))
        node.replace_all_uses_with(swapped, delete_user_cb=lambda user, swapped=swapped: user is not swapped)


def wrong_local_head_shape(gm: fx.GraphModule, rank: int) -> None:
    """Localised ``(B, T, heads, head_dim)`` views split head_dim instead of heads: ``(B, T, 2h, d/2)``
    has the same number of elements, so nothing raises. Localised calls are the ones the rewriter
    retargeted to the overload packet (``aten.reshape``, not ``aten.reshape.default``)."""
    for node in _calls(gm, torch.ops.aten.reshape):
        shape = list(node.args[1])
        if len(shape) == 4 and shape[3] % 2 == 0:
            node.args = (node.args[0], [*shape[:2], shape[2] * 2, shape[3] // 2])


BUGS = {
    "dropped backward all-reduce": drop_backward_all_reduce,
    "wrong reduce-scatter dim": wrong_reduce_scatter_dim,
    "missing partial-sum reduction": drop_partial_sum_reduction,
    "swapped shard order": swap_gathered_shard_order,
    "wrong local shape argument": wrong_local_head_shape,
}
