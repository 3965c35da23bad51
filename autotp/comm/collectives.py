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

``all_reduce``, ``all_gather`` and ``reduce_scatter`` with ``async_op=True`` start the
collective and return its result still being written; ``wait`` of it must come before any use,
and the graph computes in between (``autotp.comm.overlap`` decides what). Their backward is the
same conjugate, blocking. ``linears_with_grad_sync`` runs the column-parallel linears that read
one ``R`` input as one node whose backward overlaps the input's gradient all-reduce with the
weight gradients (Megatron-LM's asynchronous gradient all-reduce).

Plain ``torch.distributed`` calls have no autograd and functional collectives' backward for
all-reduce is another all-reduce, neither of which is the conjugate we need; hence these.
``tests/test_collectives.py`` checks each pair against a hand-computed case, and
``tests/test_conversion_sites.py`` each backward against ``redistribute.backward_steps`` (the
table the planner prices).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autotp.capture.torch_compat import c10d_functional, resolve_process_group
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


def _start_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return c10d_functional().all_reduce(x.contiguous(), "sum", group_name)


# The starts of all-gather and reduce-scatter return their result with ``dim`` moved to the
# front, as communicated: the autograd Functions return that tensor and the caller moves ``dim``
# back outside them, since the work writes the tensor until ``wait`` (gloo copies into it from its
# own thread), and autograd forbids an in-place change under a view a custom Function returned.


def _start_all_gather(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    tp_size = dist.get_world_size(_group(group_name))
    return c10d_functional().all_gather_into_tensor(x.movedim(dim, 0).contiguous(), tp_size, group_name)


def _start_reduce_scatter(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    tp_size = dist.get_world_size(_group(group_name))
    return c10d_functional().reduce_scatter_tensor(x.movedim(dim, 0).contiguous(), "sum", tp_size, group_name)


def wait(x: torch.Tensor) -> torch.Tensor:
    """``x``, an ``async_op=True`` result, once its collective has finished writing it.

    No autograd node: the gradient flows through ``x`` as is (the start's conjugate handles it);
    ``wait_tensor`` finds the work by ``x``'s storage (``x`` may be a view of the result)."""
    c10d_functional().wait_tensor(x.detach())
    return x


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
    def forward(ctx: Any, x: torch.Tensor, group_name: str, async_op: bool) -> torch.Tensor:
        return _start_all_reduce(x, group_name) if async_op else _all_reduce(x, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group_name: str, async_op: bool) -> torch.Tensor:
        ctx.dim, ctx.group_name, ctx.async_op = dim, group_name, async_op
        return _start_all_gather(x, dim, group_name) if async_op else _all_gather(x, dim, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.async_op:  # grad in the started layout, dim first
            return _chunk(grad, 0, ctx.group_name).movedim(0, ctx.dim), None, None, None
        return _chunk(grad, ctx.dim, ctx.group_name), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group_name: str, async_op: bool) -> torch.Tensor:
        ctx.dim, ctx.group_name, ctx.async_op = dim, group_name, async_op
        return _start_reduce_scatter(x, dim, group_name) if async_op else _reduce_scatter(x, dim, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.async_op:  # grad in the started layout, dim first
            return _all_gather(grad.contiguous(), 0, ctx.group_name).movedim(0, ctx.dim), None, None, None
        return _all_gather(grad.contiguous(), ctx.dim, ctx.group_name), None, None, None


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


def all_reduce(x: torch.Tensor, group_name: str, *, async_op: bool = False) -> torch.Tensor:
    """Sum of ``x`` over the group (``async_op``: started, read it through ``wait``)."""
    if _tracks_grad(x):
        return _AllReduce.apply(x, group_name, async_op)
    return _start_all_reduce(x, group_name) if async_op else _all_reduce(x, group_name)


def all_gather(x: torch.Tensor, dim: int, group_name: str, *, async_op: bool = False) -> torch.Tensor:
    """The group's ``x`` concatenated along ``dim`` (``async_op``: started, read it through ``wait``)."""
    if not async_op:
        return _AllGather.apply(x, dim, group_name, False) if _tracks_grad(x) else _all_gather(x, dim, group_name)
    started = _AllGather.apply(x, dim, group_name, True) if _tracks_grad(x) else _start_all_gather(x, dim, group_name)
    return started.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, dim: int, group_name: str, *, async_op: bool = False) -> torch.Tensor:
    """This rank's chunk along ``dim`` of the group's sum (``async_op``: started, read it through ``wait``)."""
    if not async_op:
        return _ReduceScatter.apply(x, dim, group_name, False) if _tracks_grad(x) else _reduce_scatter(x, dim, group_name)
    started = _ReduceScatter.apply(x, dim, group_name, True) if _tracks_grad(x) else _start_reduce_scatter(x, dim, group_name)
    return started.movedim(0, dim)


def all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, group_name: str) -> torch.Tensor:
    return _AllToAll.apply(x, src_dim, dst_dim, group_name) if _tracks_grad(x) else _all_to_all(x, src_dim, dst_dim, group_name)


def local_chunk(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    return _LocalChunk.apply(x, dim, group_name) if _tracks_grad(x) else _chunk(x, dim, group_name)


def to_partial(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _ToPartial.apply(x, group_name) if _tracks_grad(x) else _partial_copy(x, group_name)


def grad_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _GradAllReduce.apply(x, group_name) if _tracks_grad(x) else x


# One reader of ``linears_with_grad_sync``: (kind, W, b, beta, alpha), kind one of
#   "linear"           y = x @ W.T + b                W (out, in)
#   "addmm"            y = beta·b + alpha·(x @ W)     W (in, out), x (N, in)
#   "mm", "matmul"     y = x @ W                      W (in, out)
# (``autotp.comm.overlap.FUSED_CONTRACTIONS`` says which ops are which.)
ContractionReader = tuple[str, torch.Tensor, "torch.Tensor | None", float, float]


def _contract(x: torch.Tensor, reader: ContractionReader) -> torch.Tensor:
    kind, w, b, beta, alpha = reader
    if kind == "linear":
        return F.linear(x, w, b)
    if kind == "addmm":
        return torch.addmm(b, x, w, beta=beta, alpha=alpha)  # type: ignore[arg-type]  # addmm readers have a bias
    return torch.mm(x, w) if kind == "mm" else torch.matmul(x, w)


def _input_grad(grad: torch.Tensor, reader: ContractionReader) -> torch.Tensor:
    """This reader's part of ``grad x``, in ``grad``'s dtype (the one autocast ran it in)."""
    kind, w, _, _, alpha = reader
    w = w.to(grad.dtype)
    return grad @ w if kind == "linear" else alpha * (grad @ w.T) if kind == "addmm" else grad @ w.T


def _weight_grads(grad: torch.Tensor, x: torch.Tensor, reader: ContractionReader, *, weight: bool, bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of this reader's ``W`` and ``b``, in ``grad``'s dtype (autograd casts each to its
    parameter's)."""
    kind, _, b, beta, alpha = reader
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad.dtype)  # (N, out), (N, in)
    grad_w = None
    if weight:  # linear: grad^T x (out, in); the others: x^T grad (in, out)
        grad_w = g2.T @ x2 if kind == "linear" else alpha * (x2.T @ g2) if kind == "addmm" else x2.T @ g2
    grad_b = None
    if bias and b is not None:
        grad_b = g2.sum(0) if kind == "linear" else beta * grad.sum_to_size(b.shape)
    return grad_w, grad_b


class _LinearsWithGradSync(torch.autograd.Function):
    """``y_i`` = reader ``i``'s contraction of ``x``; backward all-reduces ``grad x`` while it
    computes the weight gradients, which do not need it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group_name: str, kinds: tuple[tuple[str, float, float], ...], *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        ctx.group_name, ctx.kinds = group_name, kinds
        ctx.save_for_backward(x, *params)
        return tuple(_contract(x, (kind, w, b, beta, alpha)) for (kind, beta, alpha), w, b in zip(kinds, params[0::2], params[1::2]))  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        readers = [(kind, w, b, beta, alpha) for (kind, beta, alpha), w, b in zip(ctx.kinds, params[0::2], params[1::2])]
        needs = ctx.needs_input_grad
        grad_x = None
        if needs[0]:  # each reader's part in its output's dtype, summed in x's, as autograd's casts back would
            parts = [_input_grad(g, reader).to(x.dtype) for g, reader in zip(grads, readers)]
            grad_x = _start_all_reduce(functools.reduce(torch.add, parts), ctx.group_name)  # the sync runs beside the weight gradients
        param_grads: list[torch.Tensor | None] = []
        for i, (g, reader) in enumerate(zip(grads, readers)):
            param_grads += _weight_grads(g, x, reader, weight=needs[3 + 2 * i], bias=needs[4 + 2 * i])
        if grad_x is not None:
            grad_x = wait(grad_x)
        return (grad_x, None, None, *param_grads)


def linears_with_grad_sync(x: torch.Tensor, readers: tuple[ContractionReader, ...], group_name: str) -> tuple[torch.Tensor, ...]:
    """Each reader's contraction of ``x`` (``ContractionReader``): the column-parallel readers of an
    ``R`` input ``x`` as one node, whose backward all-reduces ``grad x`` over ``group_name`` (the
    ``grad_all_reduce`` the readers would have) while it computes their weight gradients."""
    params = tuple(t for _, w, b, _, _ in readers for t in (w, b))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return _LinearsWithGradSync.apply(x, group_name, tuple((kind, beta, alpha) for kind, _, _, beta, alpha in readers), *params)
    return tuple(_contract(x, reader) for reader in readers)


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
