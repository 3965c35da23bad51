"""``autotp demo``: parallelize a built-in example on local CPU ranks and check it against the original."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import init_device_mesh

from autotp.api import parallelize
from autotp.examples import build_example
from autotp.rewrite.rewriter import collective_nodes


@dataclass(frozen=True, slots=True)
class DemoReport:
    summary: str
    max_abs_diff: float
    local_params: int
    full_params: int
    collectives: int
    seconds: float


def demo_rank(rank: int, world_size: int, example: str, budget_fraction: float) -> DemoReport:
    """One rank: build the example (same seed everywhere), shard it, run both, compare."""
    started = time.perf_counter()
    model, inputs = build_example(example)
    full_nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = int(full_nbytes * budget_fraction) if world_size > 1 else None
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = parallelize(model, mesh, inputs, memory_budget=budget, training=False)
    with torch.no_grad():
        diff = (sharded(*inputs) - model(*inputs)).abs().max().item()
    return DemoReport(
        summary=sharded.plan.summary(),
        max_abs_diff=diff,
        local_params=sum(p.numel() for p in sharded.parameters()),
        full_params=sum(p.numel() for p in model.parameters()),
        collectives=len(collective_nodes(sharded.graph_module)),
        seconds=time.perf_counter() - started,
    )
