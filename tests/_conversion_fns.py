"""Rank functions for tests/test_conversion_sites.py: module-level, so spawned ranks can import them."""
from __future__ import annotations

import torch
import torch.distributed as dist

from autotp.comm import collectives
from autotp.comm.redistribute import Step, StepKind, backward_steps, grad_sync_step

GRAD_SYNC = grad_sync_step(0)  # on the one axis of these 1-D groups

# Every step kind of the transition table, each tensor dim it can name on a (4, 2, 4) input.
STEPS = (
    Step(StepKind.ALL_REDUCE),
    Step(StepKind.ALL_GATHER, src_dim=0), Step(StepKind.ALL_GATHER, src_dim=2),
    Step(StepKind.REDUCE_SCATTER, dst_dim=0), Step(StepKind.REDUCE_SCATTER, dst_dim=2),
    Step(StepKind.ALL_TO_ALL, src_dim=0, dst_dim=2), Step(StepKind.ALL_TO_ALL, src_dim=2, dst_dim=0),
    Step(StepKind.LOCAL_CHUNK, dst_dim=0), Step(StepKind.LOCAL_CHUNK, dst_dim=2),
    Step(StepKind.TO_PARTIAL),
)


def _rank_ramp(shape: torch.Size, rank: int) -> torch.Tensor:
    """0, 1, 2, ... plus 100·rank, as float64: rank-dependent, exact through the collectives."""
    return torch.arange(shape.numel(), dtype=torch.float64).reshape(shape) + 100 * rank


def conjugate_cases(rank: int, world_size: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per step (and the gradient sync): (name, the autograd backward's input gradient, the
    gradient the table's conjugate steps make of the same output gradient)."""
    group_name = dist.group.WORLD.group_name
    cases = []
    for step in (*STEPS, None):
        x = _rank_ramp(torch.Size((4, 2, 4)), rank).requires_grad_()
        if step is None:  # the gradient sync: identity forward, GRAD_SYNC's conjugate backward
            out, conjugate, name = collectives.grad_all_reduce(x, group_name), (GRAD_SYNC,), "grad_all_reduce"
        else:
            fn, args = collectives.step_call(step, x, group_name)
            out, conjugate, name = fn(*args), backward_steps(step), str(step)
        grad = _rank_ramp(out.shape, rank) * 0.5
        out.backward(grad)
        expected = grad
        with torch.no_grad():
            for b in conjugate:
                fn, args = collectives.step_call(b, expected, group_name)
                expected = fn(*args)
        cases.append((name, x.grad.clone(), expected.clone()))
    return cases
