"""Rank functions for the training tests: module-level, so spawned ranks can import them."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.examples import build_example
from autotp.ir.placement import Placements, Shard, format_placements, local_chunk
from autotp.ir.plan import Plan
from autotp.rewrite.rewriter import collective_nodes

STATE_FACTOR = 4  # fp32 weights + gradients + two AdamW moments, per parameter byte


def _loss(name: str, out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if name in ("gpt", "llama"):  # next-token prediction on the example ids
        targets = torch.roll(inputs[0], -1, dims=1)
        return F.cross_entropy(out.flatten(0, 1), targets.flatten())
    return out.pow(2).mean()


def _split_count(placements: dict[str, Placements]) -> int:
    """Parameters/buffers split on some mesh axis (placements are per axis: one tuple per tensor)."""
    return sum(any(isinstance(p, Shard) for p in per_axis) for per_axis in placements.values())


def adamw_losses(
    model: nn.Module, sharded: nn.Module, loss: Callable[[str, Any, tuple[torch.Tensor, ...]], torch.Tensor],
    name: str, inputs: tuple[torch.Tensor, ...], steps: int,
) -> list[float]:
    """``steps`` AdamW steps (lr 1e-2, eps 1e-6) of ``model`` and of ``sharded`` on
    ``loss(name, output, inputs)``, interleaved; the losses in that order (reference, sharded, ...)."""
    reference_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
    sharded_opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2, eps=1e-6)
    losses = []
    for _ in range(steps):
        for net, opt in ((model, reference_opt), (sharded, sharded_opt)):
            opt.zero_grad(set_to_none=True)
            value = loss(name, net(*inputs), inputs)
            value.backward()
            opt.step()
            losses.append(value.item())
    return losses


def _parallelize(model: nn.Module, inputs: tuple[torch.Tensor, ...], world_size: int) -> autotp.ShardedModule:
    mesh = init_device_mesh("cpu", (world_size,))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return autotp.parallelize(model, mesh, inputs, memory_budget=int(nbytes * STATE_FACTOR / world_size * 1.25))


def training_equivalence(rank: int, world_size: int, names: list[str], steps: int) -> dict[str, dict[str, Any]]:
    """Gradients after one backward, then ``steps`` AdamW steps on both models, then a full
    state dict loaded into a fresh copy of the original model."""
    report = {}
    for name in names:
        model, inputs = build_example(name)
        sharded = _parallelize(model, inputs, world_size)
        placements = sharded.placements()

        _loss(name, model(*inputs), inputs).backward()
        _loss(name, sharded(*inputs), inputs).backward()
        grad_error = max(
            (p.grad - local_chunk(model.get_parameter(n).grad, placements[n], (world_size,), (rank,))).abs().max().item()
            for n, p in sharded.named_parameters()
        )

        model.zero_grad(set_to_none=True)
        sharded.zero_grad(set_to_none=True)
        # eps=1e-6, not 1e-8: GPT's key bias has an exactly-zero true gradient (softmax ignores a
        # constant added to every key score), so both models see only ~1e-10 rounding noise
        # there, which Adam with eps=1e-8 would normalise into full +-lr steps of random sign.
        losses = adamw_losses(model, sharded, _loss, name, inputs, steps)
        full = autotp.full_state_dict(sharded)
        param_error = max((full[n] - t).abs().max().item() for n, t in model.state_dict().items())

        fresh, _ = build_example(name, seed=123)
        fresh.load_state_dict(full)
        with torch.no_grad():
            roundtrip_error = (fresh(*inputs) - sharded(*inputs)).abs().max().item()
        report[name] = {
            "grad_error": grad_error,
            "reference_losses": losses[0::2],
            "sharded_losses": losses[1::2],
            "param_error": param_error,
            "roundtrip_error": roundtrip_error,
            "split_params": _split_count(placements),
            "collectives": len(collective_nodes(sharded.graph_module)),
        }
    return report


def dcp_save(rank: int, world_size: int, path: str) -> list[float]:
    """Train the GPT example one step on ``world_size`` ranks, save with DCP, return its output."""
    model, inputs = build_example("gpt")
    return _step_and_save(_parallelize(model, inputs, world_size), inputs, path)


def _step_and_save(sharded: autotp.ShardedModule, inputs: tuple[torch.Tensor, ...], path: str) -> list[float]:
    """One AdamW step of the GPT example, a DCP save to ``path``, and the output after it."""
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    _loss("gpt", sharded(*inputs), inputs).backward()
    opt.step()
    dcp.save(autotp.sharded_state_dict(sharded), checkpoint_id=path)
    with torch.no_grad():
        return sharded(*inputs).flatten().tolist()


def dcp_load(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Load on ``world_size`` ranks into a differently initialised model; return its output."""
    model, _ = build_example("gpt", seed=7)
    _, inputs = build_example("gpt")  # the inputs the saving run used
    sharded = _parallelize(model, inputs, world_size)
    state = autotp.sharded_state_dict(sharded)
    dcp.load(state, checkpoint_id=path)
    autotp.load_sharded_state_dict(sharded, state)
    with torch.no_grad():
        out = sharded(*inputs).flatten().tolist()
    return {"out": out, "split_params": _split_count(sharded.placements())}


class DropoutMLP(nn.Module):
    """fc1 -> dropout (inside the split region) -> relu -> fc2 -> dropout (after the all-reduce)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 256)
        self.inner = nn.Dropout(0.5)
        self.fc2 = nn.Linear(256, 32)
        self.outer = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.fc2(torch.relu(self.inner(self.fc1(x)))))


def dropout_masks(rank: int, world_size: int) -> dict[str, Any]:
    """The replicated-region mask is identical on every rank; split-region masks differ."""
    torch.manual_seed(0)
    model = DropoutMLP().train()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    mesh = init_device_mesh("cpu", (world_size,))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sharded = autotp.parallelize(model, mesh, (x,), memory_budget=int(nbytes / world_size * 1.3), training=False)
    inner = next(n for n in sharded.plan.nodes if n.module_path == "inner")
    outer = next(n for n in sharded.plan.nodes if n.module_path == "outer")
    recorded: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            value = super().run_node(node)
            if node.name in (inner.name, outer.name):
                recorded[node.name] = value.detach().clone()
            return value

    torch.manual_seed(42)  # the same global stream on every rank, as users seed it
    Recorder(sharded.graph_module).run(*sharded.graph_arguments(x))
    inner_mask = (recorded[inner.name] == 0).flatten()
    outer_mask = (recorded[outer.name] == 0).flatten()
    masks = [torch.zeros_like(inner_mask) for _ in range(world_size)]
    dist.all_gather_object(masks, inner_mask)
    return {
        "inner_placement": format_placements(inner.strategy.output),
        "outer_placement": format_placements(outer.strategy.output),
        "outer_mask": outer_mask.tolist(),
        "inner_masks_differ": any(not torch.equal(masks[0], m) for m in masks[1:]),
        "inner_drop_fraction": inner_mask.float().mean().item(),
    }


def dcp_save_on_mesh(rank: int, world_size: int, path: str, plan_data: dict) -> list[float]:
    """Train the GPT example one step with ``plan`` (any mesh shape, e.g. (2, 2)), save with DCP, return its output."""
    plan = Plan.from_dict(plan_data)
    model, inputs = build_example("gpt")
    mesh = init_device_mesh("cpu", tuple(plan.mesh_shape), mesh_dim_names=tuple(plan.mesh_axis_names))
    return _step_and_save(autotp.parallelize(model, mesh, inputs, plan=plan), inputs, path)
