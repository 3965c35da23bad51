"""Rank functions for tests/test_rules_coverage.py: module-level, so spawned ranks can import them."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.ir.placement import Replicate
from autotp.ir.strategy import NodeKind
from autotp.rewrite.random import run_in_sharded_stream


class RandomOpsModel(nn.Module):
    """Two linears around random draws that are zeroed out, so the output is deterministic while
    the draws still run on whatever split the plan gives them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(48, 96)
        self.fc2 = nn.Linear(96, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (B, T, 96), split on its features by a column-parallel fc1
        noise = torch.randn_like(h) * 0 + torch.bernoulli(h, 0.5) * 0
        probs = h.transpose(1, 2)[0].softmax(-1)  # (96 features, T categories)
        picked = torch.multinomial(probs, 2).sum(-1).to(h.dtype)  # (96,)
        return self.fc2(h + noise + picked * 0)


def random_ops_model(rank: int, world_size: int) -> dict[str, Any]:
    """Parallelize under a budget that forces split weights; compare with the unsharded model."""
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = RandomOpsModel().eval()
    inputs = (torch.randn(4, 12, 48, generator=torch.Generator().manual_seed(1)),)
    budget = int(sum(p.numel() * p.element_size() for p in model.parameters()) / world_size * 1.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sharded = autotp.parallelize(model, mesh, inputs, memory_budget=budget, training=False)
    autotp.manual_seed(3)
    with torch.no_grad():
        expected, actual = model(*inputs), sharded(*inputs)
    split = sorted({
        n.op for n in sharded.plan.nodes
        if n.kind is NodeKind.OP and any(not isinstance(p, Replicate) for placements in n.strategy.outputs for p in placements)
    })
    forked = sorted(
        str(n.args[0]) for n in sharded.graph_module.graph.nodes if n.op == "call_function" and n.target is run_in_sharded_stream
    )
    return {
        "max_abs_diff": (actual - expected).abs().max().item(), "shape_ok": actual.shape == expected.shape,
        "split_ops": split, "forked": forked,
    }
