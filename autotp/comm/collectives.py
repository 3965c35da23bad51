"""Collectives called from rewritten graphs, each an autograd function with its conjugate.

Convention (Megatron-LM's, generalised): the loss is computed redundantly on every rank, so
the gradient of an ``R`` tensor is ``R``, of an ``S(d)`` tensor ``S(d)``, and of a ``P`` tensor
``R`` (the true value is a sum, so each summand receives the full gradient). Each forward
conversion therefore has a fixed backward:

    forward                      backward
    all_reduce      P -> R       identity
    all_gather      S(d) -> R    local chunk of the gradient
    reduce_scatter  P -> S(d)    all_gather
    all_to_all      S(i) -> S(j) all_to_all S(j) -> S(i)
    local_chunk     R -> S(d)    all_gather
    to_partial      R -> P       identity
    grad_all_reduce identity     all_reduce   (an R input of sharded compute: its gradient is P)

Plain ``torch.distributed`` calls have no autograd and functional collectives' backward for
all-reduce is another all-reduce, neither of which is the conjugate we need; hence these.
``tests/test_collectives.py`` checks each pair against a hand-computed case, and
``tests/test_conversion_sites.py`` each backward against ``redistribute.backward_steps`` (the
table the planner prices).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from autotp.capture.torch_compat import resolve_process_group
from autotp.comm.redistribute import Step, StepKind


def _group(group_name: str) -> dist.ProcessGroup:
    return resolve_process_group(group_name)


def _all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=_group(group_name))
    return out


def _all_gather(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    group = _group(group_name)
    tp_size = dist.get_world_size(group)
    src = x.movedim(dim, 0).contiguous()
    out = src.new_empty((src.shape[0] * tp_size, *src.shape[1:]))
    dist.all_gather_single(out, src, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    group = _group(group_name)
    tp_size = dist.get_world_size(group)
    src = x.movedim(dim, 0).contiguous()
    out = src.new_empty((src.shape[0] // tp_size, *src.shape[1:]))
    dist.reduce_scatter_single(out, src, group=group)
    return out.movedim(0, dim)


def _all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, group_name: str) -> torch.Tensor:
    """Split ``dst_dim`` into chunks sent to each rank; concatenate what arrives along ``src_dim``."""
    group = _group(group_name)
    tp_size = dist.get_world_size(group)
    send = torch.stack(x.chunk(tp_size, dim=dst_dim)).contiguous()  # (tp, *local chunk)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=src_dim)


def _chunk(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    group = _group(group_name)
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group_name: str) -> torch.Tensor:
        return _all_reduce(x, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
        ctx.dim, ctx.group_name = dim, group_name
        return _all_gather(x, dim, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _chunk(grad, ctx.dim, ctx.group_name), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
        ctx.dim, ctx.group_name = dim, group_name
        return _reduce_scatter(x, dim, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group_name), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, src_dim: int, dst_dim: int, group_name: str) -> torch.Tensor:
        ctx.src_dim, ctx.dst_dim, ctx.group_name = src_dim, dst_dim, group_name
        return _all_to_all(x, src_dim, dst_dim, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _all_to_all(grad, ctx.dst_dim, ctx.src_dim, ctx.group_name), None, None, None


class _LocalChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
        ctx.dim, ctx.group_name = dim, group_name
        return _chunk(x, dim, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_gather(grad.contiguous(), ctx.dim, ctx.group_name), None, None


def _partial_copy(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """``x`` as a partial sum: rank 0 holds it, the others zeros."""
    return x.clone() if dist.get_rank(_group(group_name)) == 0 else torch.zeros_like(x)


class _ToPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group_name: str) -> torch.Tensor:
        return _partial_copy(x, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group_name), None


def _tracks_grad(x: torch.Tensor) -> bool:
    """Whether autograd will differentiate through ``x`` here; if not, the plain op is enough.

    ``Function.apply`` costs several microseconds of CPU per call, paid on every collective and
    on every ``grad_all_reduce`` marker (one per replicated input of a split op) even in
    inference, where there is no backward for it to prepare.
    """
    return torch.is_grad_enabled() and x.requires_grad


def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _AllReduce.apply(x, group_name) if _tracks_grad(x) else _all_reduce(x, group_name)


def all_gather(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    return _AllGather.apply(x, dim, group_name) if _tracks_grad(x) else _all_gather(x, dim, group_name)


def reduce_scatter(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    return _ReduceScatter.apply(x, dim, group_name) if _tracks_grad(x) else _reduce_scatter(x, dim, group_name)


def all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, group_name: str) -> torch.Tensor:
    return _AllToAll.apply(x, src_dim, dst_dim, group_name) if _tracks_grad(x) else _all_to_all(x, src_dim, dst_dim, group_name)


def local_chunk(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    return _LocalChunk.apply(x, dim, group_name) if _tracks_grad(x) else _chunk(x, dim, group_name)


def to_partial(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _ToPartial.apply(x, group_name) if _tracks_grad(x) else _partial_copy(x, group_name)


def grad_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _GradAllReduce.apply(x, group_name) if _tracks_grad(x) else x


COLLECTIVE_FUNCTIONS = frozenset({all_reduce, all_gather, reduce_scatter, all_to_all})


def step_call(step: Step, x: Any, group_name: str) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]]:
    """The function and arguments that run one ``redistribute`` table step on ``x``.

    The rewriter emits these calls; ``tests/test_conversion_sites.py`` checks each autograd
    class's backward against running ``redistribute.backward_steps`` through this same map.
    """
    if step.kind is StepKind.ALL_REDUCE:
        return all_reduce, (x, group_name)
    if step.kind is StepKind.ALL_GATHER:
        return all_gather, (x, step.src_dim, group_name)
    if step.kind is StepKind.REDUCE_SCATTER:
        return reduce_scatter, (x, step.dst_dim, group_name)
    if step.kind is StepKind.ALL_TO_ALL:
        return all_to_all, (x, step.src_dim, step.dst_dim, group_name)
    if step.kind is StepKind.LOCAL_CHUNK:
        return local_chunk, (x, step.dst_dim, group_name)
    return to_partial, (x, group_name)
