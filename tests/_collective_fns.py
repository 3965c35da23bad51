"""Rank functions for the collective tests: module-level, so spawned ranks can import them.

The inputs are built from `ramp` and `loss_weight`, which `tests/test_collectives.py` imports to
write down the expected values by hand; each case returns its forward output and input gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autotp.comm import collectives as C

# Global shape of every hand case: dims 0 and 2 divide by 2 and 3 ranks; dim 1 stays whole.
SHAPE = (6, 2, 6)
DIMS = (0, -1)
ALL_TO_ALL_DIMS = ((0, -1), (2, 0))  # (src_dim, dst_dim)

Tensors = dict[str, torch.Tensor]


def ramp(shape: tuple[int, ...], offset: float = 0.0) -> torch.Tensor:
    """0, 1, 2, ... in row-major order, plus `offset`, as float64 (exact through the collectives)."""
    numel = 1
    for size in shape:
        numel *= size
    return torch.arange(numel, dtype=torch.float64).reshape(shape) + offset


def loss_weight(shape: tuple[int, ...]) -> torch.Tensor:
    """The weight `w` of `loss = (out * w).sum()`, so d loss / d out = w: numel/2, ..., 1, 0.5."""
    numel = 1
    for size in shape:
        numel *= size
    return 0.5 * torch.arange(numel, 0, -1, dtype=torch.float64).reshape(shape)


def local_shape(dim: int, world_size: int) -> tuple[int, ...]:
    """SHAPE with `dim` divided by `world_size`: one rank's chunk of an S(dim) tensor."""
    shape = list(SHAPE)
    shape[dim] //= world_size
    return tuple(shape)


def _report(out: torch.Tensor, x: torch.Tensor, **extra: torch.Tensor) -> Tensors:
    assert x.grad is not None
    return {"out": out.detach().clone(), "grad": x.grad.clone(), **{k: v.detach().clone() for k, v in extra.items()}}


def hand_cases(rank: int, world_size: int) -> dict[str, Tensors]:
    """Every collective on deterministic rank-dependent inputs, then backward of a weighted loss.

    A loss on an S(d) output is taken through `all_gather`, so it is the same function of a
    replicated tensor on every rank (the module's convention); the S(d) output's own gradient is
    returned as "out_grad" so the conjugate of each side is visible separately.
    """
    group_name = dist.group.WORLD.group_name
    w = loss_weight(SHAPE)
    cases: dict[str, Tensors] = {}

    # P -> R: rank r holds ramp + 100 r.
    x = ramp(SHAPE, 100.0 * rank).requires_grad_()
    out = C.all_reduce(x, group_name)
    (out * w).sum().backward()
    cases["all_reduce"] = _report(out, x)

    for dim in DIMS:
        # S(dim) -> R: rank r holds a local ramp + 100 r.
        x = ramp(local_shape(dim, world_size), 100.0 * rank).requires_grad_()
        out = C.all_gather(x, dim, group_name)
        (out * w).sum().backward()
        cases[f"all_gather/{dim}"] = _report(out, x)

        # P -> S(dim): rank r holds ramp + 100 r.
        x = ramp(SHAPE, 100.0 * rank).requires_grad_()
        out = C.reduce_scatter(x, dim, group_name)
        out.retain_grad()
        (C.all_gather(out, dim, group_name) * w).sum().backward()
        cases[f"reduce_scatter/{dim}"] = _report(out, x, out_grad=out.grad)

        # R -> S(dim): every rank holds the same ramp.
        x = ramp(SHAPE).requires_grad_()
        out = C.local_chunk(x, dim, group_name)
        out.retain_grad()
        (C.all_gather(out, dim, group_name) * w).sum().backward()
        cases[f"local_chunk/{dim}"] = _report(out, x, out_grad=out.grad)

    for src_dim, dst_dim in ALL_TO_ALL_DIMS:
        # S(src) -> S(dst) of one global ramp: rank r holds its chunk along src_dim.
        x = ramp(SHAPE).chunk(world_size, src_dim)[rank].contiguous().requires_grad_()
        out = C.all_to_all(x, src_dim, dst_dim, group_name)
        out.retain_grad()
        (C.all_gather(out, dst_dim, group_name) * w).sum().backward()
        cases[f"all_to_all/{src_dim}->{dst_dim}"] = _report(out, x, out_grad=out.grad)

    # R -> P: every rank holds the same ramp; the loss reads the all-reduced (R) value.
    x = ramp(SHAPE).requires_grad_()
    out = C.to_partial(x, group_name)
    out.retain_grad()
    (C.all_reduce(out, group_name) * w).sum().backward()
    cases["to_partial"] = _report(out, x, out_grad=out.grad)

    # Identity forward; rank r's loss is its summand (r + 1) * (out * w).sum() of the true loss.
    x = ramp(SHAPE).requires_grad_()
    out = C.grad_all_reduce(x, group_name)
    ((rank + 1) * (out * w).sum()).backward()
    cases["grad_all_reduce"] = _report(out, x)
    return cases


def megatron_mlp(rank: int, world_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A 2-layer MLP split Megatron style against its single-process reference: (local, expected).

    x (R) -> grad_all_reduce -> x @ W1_r.T + b1_r (column parallel, S(-1)) -> gelu
          -> h @ W2_r.T (row parallel, P) -> all_reduce (R) -> + b2, loss = out.pow(2).sum().
    """
    group_name = dist.group.WORLD.group_name
    batch, d_model, d_hidden = 4, 6, 12
    gen = torch.Generator().manual_seed(0)  # same on every rank, so the reference is R
    x = torch.randn(batch, d_model, generator=gen)
    w1 = torch.randn(d_hidden, d_model, generator=gen) / d_model**0.5
    b1 = torch.randn(d_hidden, generator=gen)
    w2 = torch.randn(d_model, d_hidden, generator=gen) / d_hidden**0.5
    b2 = torch.randn(d_model, generator=gen)

    ref = {name: t.clone().requires_grad_() for name, t in {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2}.items()}
    ref_out = F.gelu(ref["x"] @ ref["w1"].T + ref["b1"]) @ ref["w2"].T + ref["b2"]  # (batch, d_model)
    ref_out.pow(2).sum().backward()

    local = {
        "x": x.clone(),
        "w1": w1.chunk(world_size, 0)[rank].clone(),  # (d_hidden / tp, d_model)
        "b1": b1.chunk(world_size, 0)[rank].clone(),  # (d_hidden / tp,)
        "w2": w2.chunk(world_size, 1)[rank].clone(),  # (d_model, d_hidden / tp)
        "b2": b2.clone(),
    }
    for t in local.values():
        t.requires_grad_()
    h = F.gelu(C.grad_all_reduce(local["x"], group_name) @ local["w1"].T + local["b1"])  # (batch, d_hidden / tp)
    out = C.all_reduce(h @ local["w2"].T, group_name) + local["b2"]  # (batch, d_model)
    out.pow(2).sum().backward()

    expected_grads = {
        "x": ref["x"].grad,
        "w1": ref["w1"].grad.chunk(world_size, 0)[rank],
        "b1": ref["b1"].grad.chunk(world_size, 0)[rank],
        "w2": ref["w2"].grad.chunk(world_size, 1)[rank],
        "b2": ref["b2"].grad,
    }
    report = {"out": (out.detach(), ref_out.detach())}
    for name, t in local.items():
        report[f"grad {name}"] = (t.grad.clone(), expected_grads[name].clone())
    return report


def no_grad_cases(rank: int, world_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """Each op on a tensor that requires grad, with autograd on and under no_grad (which skips the
    autograd.Function): (with grad, without, whether the no_grad result is a plain tensor)."""
    group_name = dist.group.WORLD.group_name
    ops = {
        "all_reduce": (lambda t: C.all_reduce(t, group_name), SHAPE),
        "all_gather": (lambda t: C.all_gather(t, 0, group_name), local_shape(0, world_size)),
        "reduce_scatter": (lambda t: C.reduce_scatter(t, -1, group_name), SHAPE),
        "all_to_all": (lambda t: C.all_to_all(t, 0, -1, group_name), local_shape(0, world_size)),
        "local_chunk": (lambda t: C.local_chunk(t, 0, group_name), SHAPE),
        "to_partial": (lambda t: C.to_partial(t, group_name), SHAPE),
        "grad_all_reduce": (lambda t: C.grad_all_reduce(t, group_name), SHAPE),
    }
    cases = {}
    for name, (op, shape) in ops.items():
        x = ramp(shape, 100.0 * rank).requires_grad_()
        tracked = op(x).detach()
        with torch.no_grad():
            plain = op(x)
        cases[name] = (tracked, plain.detach(), plain.grad_fn is None and (name != "grad_all_reduce" or plain is x))
    return cases


def all_cases(rank: int, world_size: int) -> dict[str, dict]:
    """Every group of checks in one spawn (spawning costs seconds; the checks take milliseconds)."""
    return {"hand": hand_cases(rank, world_size), "mlp": megatron_mlp(rank, world_size), "no_grad": no_grad_cases(rank, world_size)}
