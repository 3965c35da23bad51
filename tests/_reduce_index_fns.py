"""Rank functions for tests/test_rules_reduce_index.py: module-level, so spawned ranks can import them."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.ir.placement import Replicate
from autotp.ir.strategy import NodeKind


class ReduceScatterModel(nn.Module):
    """Two linears around value+index reductions, scans, flips, rolls, a scatter and a diagonal."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(48, 96)
        self.fc2 = nn.Linear(96, 48)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (B, T, 96)
        top = h.max(1, keepdim=True).values + h.kthvalue(2, 1).values[:, None, :]
        scanned = h.flip(1).cummax(1).values + h.logcumsumexp(1) * 0.1 + h.roll(1, 1)
        mixed = scanned.scatter_add(1, idx, h) + torch.diagonal(h[:, :, None, :] * h[:, None, :, :], 0, 1, 2).transpose(1, 2)
        y = self.fc2(mixed + top)
        return y.nansum(1) + torch.linalg.vector_norm(y, dim=1) + torch.var_mean(y, 1)[0] + y.amax(1)


def reduce_scatter_model(rank: int, world_size: int) -> dict[str, Any]:
    """Parallelize under a budget that forces split weights; compare with the unsharded model."""
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = ReduceScatterModel().eval()
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(4, 12, 48, generator=gen), torch.randint(12, (4, 12, 96), generator=gen))
    budget = int(sum(p.numel() * p.element_size() for p in model.parameters()) / world_size * 1.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sharded = autotp.parallelize(model, mesh, inputs, memory_budget=budget, training=False)
    with torch.no_grad():
        expected, actual = model(*inputs), sharded(*inputs)
    split = sorted({
        n.op for n in sharded.plan.nodes
        if n.kind is NodeKind.OP and any(not isinstance(p, Replicate) for placements in n.strategy.outputs for p in placements)
    })
    return {"max_abs_diff": (actual - expected).abs().max().item(), "split_ops": split}
