"""Rank functions and the smallest models of the training-state bugs (issue 21): the forward is
right while a gradient, a buffer or a weight is not. Module-level so spawned ranks can import them."""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.errors import AutoTPError
from autotp.ir.placement import Shard, local_chunk
from autotp.rewrite.rewriter import collective_nodes


class StraightThrough(torch.autograd.Function):
    """Quantise forward, a scaled identity backward: differentiating its forward gives zero."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * 3, None


class QuantisedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(StraightThrough.apply(F.gelu(self.up(x)), 4.0))


class CachedMLP(nn.Module):
    """An MLP that writes its hidden state into a slice of a cache and keeps a running mean."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.register_buffer("cache", torch.zeros(8, 96))
        self.register_buffer("running_mean", torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x))
        self.cache[:, :64] = h.detach()
        self.running_mean.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        return self.down(h) + self.cache[:, 60:76].sum()


class FrequencyScaledEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32, scale_grad_by_freq=True)
        self.head = nn.Linear(32, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def _inputs(name: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    if name == "embedding":
        return (torch.randint(0, 64, (4, 12), generator=generator),)
    return (torch.randn(8, 16, generator=generator),)


MODELS: dict[str, Callable[[], nn.Module]] = {"autograd_function": QuantisedMLP, "buffer_writes": CachedMLP, "embedding": FrequencyScaledEmbedding}


def _budget(model: nn.Module, world_size: int) -> int:
    """Room for parameters, gradients and AdamW state split across the ranks, and little more."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    return int(nbytes * 4 / world_size * 1.4)


def training_state(rank: int, world_size: int, names: list[str], pins: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """For each model: forward, every gradient, one AdamW step and every buffer, sharded against the original."""
    mesh = init_device_mesh("cpu", (world_size,))
    report = {}
    for name in names:
        torch.manual_seed(0)
        model = MODELS[name]()
        reference = copy.deepcopy(model)
        inputs = _inputs(name)
        sharded = autotp.parallelize(model, mesh, inputs, memory_budget=_budget(model, world_size), hardware="h100-sxm")
        placements = sharded.placements()

        out, expected = sharded(*inputs), reference(*inputs)
        forward_error = (out - expected).abs().max().item()
        out.pow(2).mean().backward()
        expected.pow(2).mean().backward()
        grad_errors = {n: (p.grad - local_chunk(reference.get_parameter(n).grad, placements[n], (world_size,), (rank,))).abs().max().item() for n, p in sharded.named_parameters()}
        for net in (sharded, reference):
            torch.optim.AdamW(net.parameters(), lr=1e-2).step()
        full = autotp.full_state_dict(sharded)
        state_errors = {n: (full[n].float() - t.float()).abs().max().item() for n, t in reference.state_dict().items()}
        report[name] = {
            "forward": forward_error,
            "grads": grad_errors,
            "state": state_errors,
            "reference_grad_max": max(p.grad.abs().max().item() for p in reference.parameters()),
            "split": sorted(n for n, p in placements.items() if any(isinstance(x, Shard) for x in p)),
            "collectives": len(collective_nodes(sharded.graph_module)),
        }
    return report


def different_seeds(rank: int, world_size: int, check: bool) -> dict[str, Any]:
    """Every rank builds the model with its own seed: parallelize refuses, or (unchecked) runs."""
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(rank)
    model = QuantisedMLP()
    try:
        autotp.parallelize(model, mesh, _inputs("autograd_function"), memory_budget=_budget(model, world_size), check_replicas=check)
    except AutoTPError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None}
