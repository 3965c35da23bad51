"""Rank functions for the vocab-parallel tests: module-level, so spawned ranks can import them."""
from __future__ import annotations

from typing import Any

from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.api import plan_model
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.ir.placement import P, R, Shard
from autotp.ir.strategy import MeshStrategy, OpStrategy, one_axis
from autotp.solve.build import build_plan
from autotp.solve.ilp import solve


def vocab_parallel_pins(space: Any) -> dict[str, MeshStrategy]:
    """Embedding, LM head and loss split on the vocabulary (Megatron-LM's vocab parallelism)."""
    pins = {}
    for node in space.nodes:
        if node.module_path == "wte" and node.op.startswith("aten.embedding"):
            pins[node.name] = one_axis(OpStrategy((Shard(0), R), P))
        elif node.module_path == "lm_head":
            pins[node.name] = one_axis(OpStrategy((R, Shard(0)), Shard(2)))
        elif node.op.startswith("aten.cross_entropy_loss"):
            pins[node.name] = one_axis(OpStrategy((Shard(1), R), R))
    return pins


def vocab_parallel_equivalence(rank: int, world_size: int) -> dict[str, Any]:
    """Loss and gradients of the GPT example with the vocab-parallel layers pinned."""
    model, inputs = build_example("gpt", targets=True)
    result = plan_model(model, inputs, mesh_shape=(world_size,), hardware="cpu-gloo", memory_budget=None)
    cost = CostModel(resolve_hardware("cpu-gloo"), world_size, training=True, optimizer="adamw")
    pins = vocab_parallel_pins(result.space)
    plan = build_plan(result.space, solve(result.space, cost, pinned=pins).chosen(result.space), cost, hardware="cpu-gloo", memory_budget=None)
    sharded = autotp.parallelize(model, init_device_mesh("cpu", (world_size,)), inputs, plan=plan)
    expected = model(*inputs)
    actual = sharded(*inputs)
    expected.backward()
    actual.backward()
    wte_grad = model.wte.weight.grad.chunk(world_size, 0)[rank]
    targets = [n.target.__name__ for n in sharded.graph_module.graph.nodes if n.op == "call_function" and hasattr(n.target, "__name__")]
    return {
        "pins": len(pins),
        "loss": (actual.item(), expected.item()),
        "wte_grad_error": (sharded.wte.weight.grad - wte_grad).abs().max().item(),
        "local_vocab": sharded.wte.weight.shape[0],
        "ops": targets,
    }
