"""Rank functions for the end-to-end tests: module-level, so spawned ranks can import them."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.examples import build_example
from autotp.rewrite.rewriter import collective_nodes

ATOL, RTOL = 1e-5, 1e-4


class RenormHead(torch.nn.Module):
    """A linear, then an op no rule covers: it must run replicated, and correctly."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.renorm(self.proj(x).view(-1, 8, 8), 2, 0, 1.0)


def build_model(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    if name == "transformer_encoder_layer":
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
        return layer.eval(), (torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1)),)
    if name == "unsupported_op":
        torch.manual_seed(0)
        return RenormHead().eval(), (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)),)
    if name == "odd_mlp":  # hidden width 6: not divisible by 4 ranks
        return build_example("mlp", d_model=64, d_hidden=6)
    return build_example(name)


def parallel_equivalence(rank: int, world_size: int, names: list[str]) -> dict[str, dict[str, Any]]:
    """For each model: parallelize under a budget that forces splits; compare with the original."""
    mesh = init_device_mesh("cpu", (world_size,))
    report = {}
    for name in names:
        model, inputs = build_model(name)
        full_nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        budget = int(full_nbytes / world_size * 1.25) if world_size > 1 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", autotp.UnsupportedOpWarning)  # expected for unsupported_op
            sharded = autotp.parallelize(model, mesh, inputs, memory_budget=budget, training=False)
        with torch.no_grad():
            expected = model(*inputs)
            actual = sharded(*inputs)
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
        report[name] = {
            "max_abs_diff": (actual - expected).abs().max().item(),
            "collectives": [n.target.__name__ for n in collective_nodes(sharded.graph_module)],
            "local_params": sum(p.numel() for p in sharded.parameters()),
            "full_params": sum(p.numel() for p in model.parameters()),
            "state_keys_match": set(sharded.state_dict()) == set(model.state_dict()),
            "sharded_names": sorted(n for n, p in sharded.named_parameters() if p.shape != model.get_parameter(n).shape),
        }
    return report
