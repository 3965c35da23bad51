"""Rank functions for tests/test_plan_agreement.py: module-level, so spawned ranks can import them.

Each returns what ``parallelize`` raised on its rank (type name and message) instead of raising,
so that the test sees every rank's error, not only the first one to reach the harness.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
import autotp.api
import autotp.runtime.agreement
from autotp.runtime.agreement import plan_digest
from autotp.solve.planner import replicate_all

VOCAB, WIDTH = 64, 32


class TokenMLP(nn.Module):
    """Embedding then a two-layer MLP: small, and its input is named ``input_ids``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(input_ids))))  # (B, T, WIDTH)


def build(seq: int = 16) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return TokenMLP().eval(), (torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1)),)


def _outcome(call: Any) -> tuple[str, str]:
    try:
        call()
    except autotp.AutoTPError as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def shapes_differ(rank: int, world_size: int) -> tuple[str, str]:
    """Rank 1 is given sequence length 8, rank 0 sixteen."""
    mesh = init_device_mesh("cpu", (world_size,))
    model, inputs = build(seq=16 if rank == 0 else 8)
    return _outcome(lambda: autotp.parallelize(model, mesh, inputs, training=False, setup_timeout_s=60))


def versions_differ(rank: int, world_size: int) -> tuple[str, str]:
    """Rank 1 reports another autotp version."""
    mesh = init_device_mesh("cpu", (world_size,))
    if rank == 1:
        autotp.runtime.agreement.AUTOTP_VERSION = "0.0.0-other"
    model, inputs = build()
    return _outcome(lambda: autotp.parallelize(model, mesh, inputs, training=False, setup_timeout_s=60))


def rank0_infeasible(rank: int, world_size: int) -> tuple[str, str]:
    """A budget no plan fits: rank 0's planning raises InfeasiblePlanError."""
    mesh = init_device_mesh("cpu", (world_size,))
    model, inputs = build()
    return _outcome(lambda: autotp.parallelize(model, mesh, inputs, training=False, memory_budget=1000, setup_timeout_s=60))


def only_rank0_plans(rank: int, world_size: int) -> dict[str, Any]:
    """Rank 1's solver is replaced by one that would choose another plan (all replicated, as a
    solver stopped early might); the ranks must still run rank 0's plan, with the original's output."""
    mesh = init_device_mesh("cpu", (world_size,))
    model, inputs = build()
    full_nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    own_plans: list[str] = []
    if rank != 0:
        def solve_differently(space: Any, cost: Any, **kwargs: Any) -> autotp.Plan:
            plan = replicate_all(space, cost, hardware=kwargs["hardware"])
            own_plans.append(plan_digest(plan))
            return plan

        autotp.api.solve_plan = solve_differently  # type: ignore[assignment]
    sharded = autotp.parallelize(model, mesh, inputs, training=False, memory_budget=int(full_nbytes * 0.6), setup_timeout_s=60)
    with torch.no_grad():
        torch.testing.assert_close(sharded(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)
    return {
        "digest": plan_digest(sharded.plan),
        "own_solves": len(own_plans),
        "split": sorted(n for n, p in sharded.named_parameters() if p.shape != model.get_parameter(n).shape),
    }


def rank0_too_slow(rank: int, world_size: int) -> tuple[str, str, float]:
    """Rank 0's planning takes longer than setup_timeout_s: every rank gets a typed error, in bounded time."""
    mesh = init_device_mesh("cpu", (world_size,))
    model, inputs = build()
    if rank == 0:
        real = autotp.api._solve_space

        def slow(*args: Any, **kwargs: Any) -> autotp.Plan:
            time.sleep(6.0)
            return real(*args, **kwargs)

        autotp.api._solve_space = slow  # type: ignore[assignment]
    started = time.monotonic()
    kind, message = _outcome(lambda: autotp.parallelize(model, mesh, inputs, training=False, setup_timeout_s=2))
    return kind, message, time.monotonic() - started
