"""Rank functions for the N-D mesh tests: module-level, so spawned ranks can import them."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.comm import collectives
from autotp.examples import build_example
from autotp.ir.placement import local_chunk
from autotp.ir.plan import Plan
from autotp.rewrite.rewriter import collective_nodes


def loss_of(name: str, out: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if name in ("gpt", "llama"):  # next-token prediction on the example ids
        targets = torch.roll(inputs[0], -1, dims=1)
        return F.cross_entropy(out.flatten(0, 1), targets.flatten())
    if hasattr(out, "logits"):  # a Hugging Face output
        targets = torch.roll(inputs[0], -1, dims=1)
        return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    return out.pow(2).mean()


def equivalence_on_mesh(
    rank: int, world_size: int, name: str, model: nn.Module | None, inputs: tuple[torch.Tensor, ...] | None,
    plan: Plan, mesh_shape: tuple[int, ...], axis_names: tuple[str, ...], steps: int,
) -> dict[str, Any]:
    """Forward, gradients and ``steps`` AdamW steps of ``plan`` on a real mesh against the original."""
    if model is None:
        model, inputs = build_example(name)
    assert inputs is not None
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=axis_names)
    sharded = autotp.parallelize(model, mesh, inputs, plan=plan)
    placements = sharded.placements()
    coordinate = tuple(mesh.get_local_rank(a) for a in range(mesh.ndim))

    forward_error = _max_error(_logits(sharded(*inputs)), _logits(model(*inputs)))
    loss_of(name, model(*inputs), inputs).backward()
    loss_of(name, sharded(*inputs), inputs).backward()
    grad_error = max(
        (p.grad - local_chunk(model.get_parameter(n).grad, placements[n], mesh_shape, coordinate)).abs().max().item()
        for n, p in sharded.named_parameters()
    )
    model.zero_grad(set_to_none=True)
    sharded.zero_grad(set_to_none=True)
    reference_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
    sharded_opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2, eps=1e-6)
    losses = []
    for _ in range(steps):
        for net, opt in ((model, reference_opt), (sharded, sharded_opt)):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(name, net(*inputs), inputs)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    param_error = max(
        (p.detach() - local_chunk(model.get_parameter(n).detach(), placements[n], mesh_shape, coordinate)).abs().max().item()
        for n, p in sharded.named_parameters()
    )
    full = autotp.full_state_dict(sharded)
    full_error = max((full[n] - t).abs().max().item() for n, t in model.state_dict().items())
    return {
        "forward_error": forward_error,
        "grad_error": grad_error,
        "param_error": param_error,
        "full_error": full_error,
        "reference_losses": losses[0::2],
        "sharded_losses": losses[1::2],
        "collective_axes": _collective_axes(sharded.graph_module, sharded.group_names),
    }


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach() - b.detach()).abs().max().item()


def _collective_axes(gm: torch.fx.GraphModule, group_names: tuple[str, ...]) -> dict[int, int]:
    """Collectives (forward ones and gradient syncs) in the rank-local graph, counted per mesh axis."""
    counts = dict.fromkeys(range(len(group_names)), 0)
    nodes = [*collective_nodes(gm), *(n for n in gm.graph.nodes if n.op == "call_function" and n.target is collectives.grad_all_reduce)]
    for node in nodes:
        names = [a for a in node.args if isinstance(a, str)]
        for axis, group in enumerate(group_names):
            if group in names:
                counts[axis] += 1
    return counts
