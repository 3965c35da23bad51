"""Rank functions for tests/test_sharded_calls.py: module-level, so spawned ranks can import them."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.examples import build_example
from autotp.ir.placement import Shard, local_chunk
from autotp.rewrite.rewriter import collective_nodes
from tests._training_fns import STATE_FACTOR


class ScaledMLP(nn.Module):
    """An MLP whose output is scaled by a Python int: export bakes ``n`` into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) * n


class TwoInputs(nn.Module):
    """Asymmetric in its arguments, so binding them in the wrong order changes the answer."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.down(torch.relu(self.up(a))) - 2 * b
        return out if mask is None else out * mask


class LongSequencesDoubled(nn.Module):
    """Python control flow on a size: longer sequences take an extra op, so the graph changes with it."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        if x.shape[1] > 4:
            h = h * 2
        return self.down(h)


def _budget(model: nn.Module, world_size: int) -> int:
    """Parameter bytes that only a split of the weights fits."""
    return int(sum(p.numel() * p.element_size() for p in model.parameters()) / world_size * 1.25)


def _outcome(call: Any) -> str:
    """``"ok"`` or the error's type and message, so the parent can assert on it."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test asserts which type it was
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def sharded_calls(rank: int, world_size: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world_size,))
    report: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(1)

    torch.manual_seed(0)
    scaled = ScaledMLP().eval()
    x = torch.randn(4, 16, generator=generator)
    sharded = autotp.parallelize(scaled, mesh, (x, 3), memory_budget=_budget(scaled, world_size), training=False)
    with torch.no_grad():
        report["scalar_same_error"] = (sharded(x, 3) - scaled(x, 3)).abs().max().item()
        report["scalar_keyword_error"] = (sharded(x, n=3) - scaled(x, 3)).abs().max().item()
        report["scalar_other"] = _outcome(lambda: sharded(x, 5))
    report["scalar_collectives"] = len(collective_nodes(sharded.graph_module))

    torch.manual_seed(0)
    two = TwoInputs().eval()
    a, b = torch.randn(4, 16, generator=generator), torch.randn(4, 16, generator=generator)
    sharded = autotp.parallelize(two, mesh, (a, b), memory_budget=_budget(two, world_size), training=False)
    with torch.no_grad():
        expected = two(a, b)
        report["keyword_swapped_error"] = (sharded(b=b, a=a) - expected).abs().max().item()
        report["keyword_mixed_error"] = (sharded(a, b=b) - expected).abs().max().item()
        report["keyword_default_error"] = (sharded(a, b, mask=None) - expected).abs().max().item()
        report["keyword_unplanned"] = _outcome(lambda: sharded(a, b, mask=torch.ones(4, 16)))
        report["keyword_missing"] = _outcome(lambda: sharded(a))
        report["dtype_other"] = _outcome(lambda: sharded(a.double(), b.double()))
        report["batch_other"] = _outcome(lambda: sharded(a[:3], b[:3]))
    report["two_split_params"] = sum(isinstance(p, Shard) for placements in sharded.placements().values() for p in placements)

    torch.manual_seed(0)
    branching = LongSequencesDoubled().eval()
    x = torch.randn(2, 3, 16, generator=generator)
    sharded = autotp.parallelize(branching, mesh, (x,), memory_budget=_budget(branching, world_size), training=False, dynamic_dims={"x": (1,)})
    with torch.no_grad():
        short = torch.randn(2, 2, 16, generator=generator)
        report["branch_same_side_error"] = (sharded(short) - branching(short)).abs().max().item()
        report["branch_other_side"] = _outcome(lambda: sharded(torch.randn(2, 6, 16)))
    return report


def gpt_other_sizes(rank: int, world_size: int) -> dict[str, Any]:
    """The GPT example (attention reshapes by batch and sequence) at sizes other than planned."""
    mesh = init_device_mesh("cpu", (world_size,))
    model, (idx,) = build_example("gpt", batch=2, seq=8)
    budget = _budget(model, world_size)
    report: dict[str, Any] = {}

    fixed = autotp.parallelize(model, mesh, (idx,), memory_budget=budget, training=False)
    report["fixed_other_batch"] = _outcome(lambda: fixed(idx.repeat(2, 1)))
    report["fixed_targets"] = _outcome(lambda: fixed(idx, targets=idx))

    model.train()  # dropout is 0: train mode only turns autograd bookkeeping on for the comparison
    sharded = autotp.parallelize(model, mesh, (idx,), memory_budget=int(budget * STATE_FACTOR), dynamic_dims={"idx": (0, 1)})
    placements = sharded.placements()
    report["split_params"] = sum(isinstance(p, Shard) for ps in placements.values() for p in ps)
    wide = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(7))
    errors = {}
    for name, inputs in {"planned": idx, "batch 3 seq 5": wide, "batch 3 seq 5 again": wide}.items():
        model.zero_grad(set_to_none=True)
        sharded.zero_grad(set_to_none=True)
        expected, actual = model(inputs), sharded(inputs)
        expected.square().mean().backward()
        actual.square().mean().backward()
        grad_error = max(
            (p.grad - local_chunk(model.get_parameter(n).grad, placements[n], (world_size,), (rank,))).abs().max().item()
            for n, p in sharded.named_parameters()
        )
        errors[name] = {"shape": tuple(actual.shape), "output": (actual - expected).abs().max().item(), "grad": grad_error}
    report["dynamic"] = errors
    report["graphs_built"] = len(sharded._retracer._graphs)
    report["dynamic_collectives"] = len(collective_nodes(sharded._retracer.graph_for(((3, 5),))))
    report["dynamic_rank_changed"] = _outcome(lambda: sharded(idx[0]))
    return report
