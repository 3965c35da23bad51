"""Rank functions for the N-D mesh tests: module-level, so spawned ranks can import them."""
from __future__ import annotations

import functools
import math
from pathlib import Path
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
from tests._training_fns import adamw_losses


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
    losses = adamw_losses(model, sharded, loss_of, name, inputs, steps)
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
    nodes = [*collective_nodes(gm), *(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (collectives.grad_all_reduce, collectives.linears_with_grad_sync))]
    for node in nodes:
        names = [a for a in node.args if isinstance(a, str)]
        for axis, group in enumerate(group_names):
            if group in names:
                counts[axis] += 1
    return counts


# ---- (2, 2) ("dp", "tp") plans of the examples and of Hugging Face models, shared by the 2-D tests ----

MESH_2D, AXES_2D = (2, 2), ("dp", "tp")
# Budgeted 2-D planning of the transformers is slow today (about 2 minutes for LLaMA on this 2-core
# machine even when the solver stops after 3 branch-and-bound nodes), so their plans are pinned:
# made once by ``python -m tests._mesh_fns`` and stored in tests/plans_2d/. The node limit, not a
# time limit, stops the solver, so the files do not depend on the machine that wrote them.
PINNED_DIR = Path(__file__).resolve().parent / "plans_2d"
PINNED = ("gpt", "llama", "hf-gpt2", "hf-llama")
NODE_LIMIT_2D = 3
STATE_FACTOR = 4  # fp32 weights + gradients + two AdamW moments, per parameter byte


def build_model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A built-in example ("mlp", "gpt", "llama") or, as "hf-gpt2", a tiny Hugging Face model."""
    if name.startswith("hf-"):
        from tests._hf_fns import build_hf_model

        return build_hf_model(name.removeprefix("hf-"))
    return build_example(name)


def solve_2d(name: str) -> Plan:
    """``name`` planned on the (2, 2) mesh for cpu-gloo, its budget 1.3/4 of the replicated
    training state (fp32 weights, gradients and two AdamW moments): no whole weight fits, so both
    axes must split parameters."""
    model, inputs = build_model(name)
    state_nbytes = STATE_FACTOR * sum(p.numel() * p.element_size() for p in model.parameters())
    budget = int(state_nbytes * 1.3 / math.prod(MESH_2D))
    return autotp.plan(
        model, inputs, mesh_shape=MESH_2D, mesh_axis_names=AXES_2D, hardware="cpu-gloo", memory_budget=budget,
        node_limit=NODE_LIMIT_2D, time_limit_s=1800.0,
    )


@functools.cache
def plan_2d(name: str) -> Plan:
    """The pinned plan of ``name`` where there is one, else a fresh ``solve_2d``."""
    return Plan.load(str(PINNED_DIR / f"{name}.json")) if name in PINNED else solve_2d(name)


def equivalence_of_models(rank: int, world_size: int, plans: dict[str, dict], steps: int) -> dict[str, dict[str, Any]]:
    """``equivalence_on_mesh`` for each model of ``plans`` (name -> plan dict) in one set of ranks."""
    reports = {}
    for name, data in plans.items():
        model, inputs = build_model(name)
        plan = Plan.from_dict(data)
        reports[name] = equivalence_on_mesh(rank, world_size, name, model, inputs, plan, tuple(plan.mesh_shape), tuple(plan.mesh_axis_names), steps)
    return reports


if __name__ == "__main__":  # python -m tests._mesh_fns [names]: (re)write the pinned plans
    import sys
    import time

    PINNED_DIR.mkdir(exist_ok=True)
    for model_name in sys.argv[1:] or PINNED:
        started = time.perf_counter()
        solve_2d(model_name).save(str(PINNED_DIR / f"{model_name}.json"))
        print(f"{model_name}: planned in {time.perf_counter() - started:.0f}s", flush=True)
