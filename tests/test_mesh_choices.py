"""The planner's choices on a (2 nodes, 8 GPUs) mesh of H100s, asserted on the plan (issue 19).

LLaMA-3-8B's shape with its loss inside the graph (as a training step runs it; a model that
returns its logits would have to all-gather 128k-vocab logits to every rank, which then decides
everything), and a global batch of 64 x 2048 tokens, a common one for 16 GPUs (at 8 x 2048 the
activations a rank holds weigh less than a layer's weights, and splitting the MLP across nodes
is priced below all-reducing its gradient there). Axis 0 ("node") spans the
two nodes over InfiniBand, axis 1 ("gpu") the eight GPUs of a node over NVLink.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import autotp
from autotp.examples import build_example
from autotp.ir.placement import R, Shard
from autotp.ir.plan import Plan

LLAMA_3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256)
SMALL = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=8, ffn_hidden=1024, vocab_size=1024)
MESH, AXES = (2, 8), ("node", "gpu")
NODE, GPU = 0, 1
STATE_FACTOR = 4  # fp32 weights, gradients and two AdamW moments per parameter byte


class TrainingStep(nn.Module):
    """The model and its next-token loss: what one training step differentiates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(ids).flatten(0, 1), targets.flatten())


def _plan(config: dict, *, budget_factor: float | None = None) -> Plan:
    model, (ids,) = build_example("llama", device="meta", batch=64, seq=2048, max_seq_len=2048, **config)
    budget = None
    if budget_factor is not None:
        state = STATE_FACTOR * sum(p.numel() * p.element_size() for p in model.parameters())
        budget = int(state / (MESH[0] * MESH[1]) * budget_factor)
    return autotp.plan(
        TrainingStep(model), (ids, torch.zeros_like(ids)), mesh_shape=MESH, mesh_axis_names=AXES,
        hardware="h100-sxm", memory_budget=budget,
    )


def _block_linears(plan: Plan) -> list:
    linears = [n for n in plan.nodes if n.op.startswith("aten.linear") and ".layers." in n.module_path]
    assert linears
    return linears


def _stored(plan: Plan) -> dict[str, tuple]:
    return {n.name: n.strategy.output for n in plan.nodes if n.kind.value == "state"}


def _weight_of(plan: Plan, linear) -> str:
    return linear.inputs[1].node


def _data_parallel_on(axis: int, linear) -> bool:
    """The linear reads its weight whole over ``axis`` and splits its tokens (batch or sequence) over it."""
    activation, weight = linear.strategy.inputs[0], linear.strategy.inputs[1]
    return weight[axis] == R and activation[axis] in (Shard(0), Shard(1))


def test_8b_puts_data_parallelism_across_nodes_and_splits_layers_inside_a_node() -> None:
    plan = _plan(LLAMA_3_8B)
    assert plan.mesh.names == AXES and plan.mesh.shape == MESH
    linears = _block_linears(plan)
    assert all(_data_parallel_on(NODE, n) for n in linears), [(n.module_path, str(n.strategy)) for n in linears if not _data_parallel_on(NODE, n)]
    mlp = [n for n in linears if ".feed_forward." in n.module_path]
    assert all(isinstance(n.strategy.inputs[1][GPU], Shard) for n in mlp)  # tensor parallel over NVLink
    stored = _stored(plan)
    assert all(stored[_weight_of(plan, n)][NODE] == R for n in linears)  # DP: weights whole on each node...
    assert all(isinstance(stored[_weight_of(plan, n)][GPU], Shard) for n in mlp)  # ...split over its GPUs


def test_8b_moves_to_fsdp_across_nodes_under_a_tight_budget() -> None:
    plan = _plan(LLAMA_3_8B, budget_factor=1.1)
    assert plan.memory_nbytes_per_device <= plan.memory_budget
    linears = _block_linears(plan)
    assert all(_data_parallel_on(NODE, n) for n in linears)
    stored = _stored(plan)
    fsdp = [n for n in linears if isinstance(stored[_weight_of(plan, n)][NODE], Shard)]  # stored split, read whole: gathered
    assert len(fsdp) >= len(linears) // 2, [(n.module_path, stored[_weight_of(plan, n)]) for n in linears]


def test_a_small_model_is_data_parallel_on_both_axes() -> None:
    plan = _plan(SMALL)
    linears = _block_linears(plan)
    assert all(_data_parallel_on(NODE, n) and _data_parallel_on(GPU, n) for n in linears), [str(n.strategy) for n in linears]
    assert all(placements == (R, R) for name, placements in _stored(plan).items() if "layers" in name)
