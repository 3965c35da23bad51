"""Planner behaviour, offline on meta-device models: no processes, no allocation."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

import autotp
from autotp.api import plan_model
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.ir.placement import P, R, Shard
from autotp.ir.plan import Plan
from autotp.rewrite.rewriter import collective_nodes, rewrite
from autotp.solve.build import build_plan
from autotp.solve.ilp import solve
from autotp.solve.layouts import megatron_pins
from autotp.solve.memory import min_state_nbytes
from autotp.strategies.engine import NodeKind

N_LAYER = 2


def _big_gpt(batch: int, seq: int):
    return build_example("gpt", device="meta", batch=batch, seq=seq, n_embd=4096, n_head=32, n_layer=N_LAYER, vocab_size=50304, block_size=1024)


def _param_nbytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _block_of(module_path: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", module_path + ".")
    return int(match.group(1)) if match else None


def _linear(plan: Plan, suffix: str, block: int):
    (node,) = [n for n in plan.nodes if n.module_path == f"blocks.{block}.{suffix}" and n.op.startswith("aten.linear")]
    return node


# bytes per parameter byte the budget must hold: fp32 weights, + gradients and AdamW's two moments
STATE_FACTOR = {False: 1, True: 4}


@pytest.fixture(scope="module", params=[False, True], ids=["inference", "training"])
def megatron_case(request):
    """GPT n_embd=4096 on 4 H100s with weights that cannot be replicated, at 1 x 64 tokens."""
    training = request.param
    model, inputs = _big_gpt(1, 64)
    budget = int(_param_nbytes(model) * STATE_FACTOR[training] / 4 * 1.15)  # about a quarter per device
    return plan_model(model, inputs, mesh_shape=(4,), hardware="h100-sxm", memory_budget=budget, training=training), budget


def test_megatron_layout_is_rediscovered(megatron_case) -> None:
    result, budget = megatron_case
    plan = result.plan
    assert plan.memory_nbytes_per_device <= budget < plan.replicated_param_nbytes * STATE_FACTOR[plan.training]
    for block in range(N_LAYER):
        for suffix in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.c_fc"):
            strategy = _linear(plan, suffix, block).strategy.axis(0)
            assert strategy.inputs[:2] == (R, Shard(0)) and strategy.output == Shard(2), f"{suffix}: {strategy}"
        for suffix in ("attn.c_proj", "mlp.c_proj"):
            strategy = _linear(plan, suffix, block).strategy.axis(0)
            assert strategy.inputs[:2] == (Shard(2), Shard(1)) and strategy.output == P, f"{suffix}: {strategy}"


def test_megatron_plan_has_two_all_reduces_per_block(megatron_case) -> None:
    result, _ = megatron_case
    per_block: dict[int, Counter] = {b: Counter() for b in range(N_LAYER)}
    for node, conversion in result.plan.collectives():
        block = _block_of(node.module_path)
        if block is not None:
            per_block[block][conversion.kind] += 1
    for block, kinds in per_block.items():
        assert kinds["all_reduce"] == 2, (block, kinds)
        # at most one other collective, in block 0: converting its input, the embedding output,
        # which is split or partial because the embedding table is
        assert sum(kinds.values()) <= 2 + (1 if block == 0 else 0), (block, kinds)


def test_megatron_all_reduces_in_rewritten_graph(megatron_case) -> None:
    result, _ = megatron_case
    gm = rewrite(result.captured, result.space, result.plan, coordinate=(0,), group_names=("offline",))
    reduced = Counter()
    for node in collective_nodes(gm):
        if node.target.__name__ == "all_reduce":
            stack = node.args[0].meta.get("nn_module_stack", {})
            path = next(reversed(stack.values()))[0] if stack else ""
            reduced[_block_of(path)] += 1
    assert all(reduced[b] == 2 for b in range(N_LAYER)), reduced


def test_megatron_is_the_ilp_optimum_here(megatron_case) -> None:
    """Pinning Megatron's layout costs the same as the free optimum: it is the optimum."""
    result, budget = megatron_case
    cost = CostModel(resolve_hardware("h100-sxm"), 4, training=result.plan.training, optimizer=result.plan.optimizer)
    pins = megatron_pins(result.space)
    assert len(pins) == 6 * N_LAYER
    pinned = build_plan(result.space, solve(result.space, cost, memory_budget=budget, pinned=pins).chosen(result.space), cost, hardware="h100-sxm", memory_budget=budget)
    assert pinned.total_seconds == pytest.approx(result.plan.total_seconds, rel=1e-6)


def test_megatron_pins_cost_at_least_the_optimum_at_large_batch() -> None:
    """At 8 x 1024 tokens the ILP may beat Megatron (sequence-parallel variants); never lose to it."""
    model, inputs = _big_gpt(8, 1024)
    budget = int(_param_nbytes(model) / 4 * 1.15)
    result = plan_model(model, inputs, mesh_shape=(4,), hardware="h100-sxm", memory_budget=budget, training=False)
    cost = CostModel(resolve_hardware("h100-sxm"), 4)
    pins = megatron_pins(result.space)
    pinned = build_plan(result.space, solve(result.space, cost, memory_budget=budget, pinned=pins).chosen(result.space), cost, hardware="h100-sxm", memory_budget=budget)
    assert result.plan.total_seconds <= pinned.total_seconds * (1 + 1e-9)
    # and every linear of every block is split one way or another: nothing runs replicated
    for node in result.plan.nodes:
        if node.op.startswith("aten.linear") and _block_of(node.module_path) is not None:
            strategy = node.strategy.axis(0)
            assert any(isinstance(p, Shard) for p in strategy.inputs + (strategy.output,)), node


def test_tiny_hidden_on_slow_link_is_not_split() -> None:
    """n_embd=64 over PCIe: communication costs more than splitting saves, so blocks stay whole."""
    model, inputs = build_example("gpt", device="meta", batch=2, seq=32, n_embd=64, n_head=4, n_layer=N_LAYER)
    plan = autotp.plan(model, inputs, mesh_shape=(4,), hardware="a100-pcie", training=False)
    block_collectives = [c for n, c in plan.collectives() if _block_of(n.module_path) is not None]
    assert len(block_collectives) < 2 * N_LAYER  # fewer than Megatron's two all-reduces per block
    for node in plan.nodes:
        if node.op.startswith("aten.linear") and _block_of(node.module_path) is not None:
            strategy = node.strategy.axis(0)
            assert all(p == R for p in strategy.inputs) and strategy.output == R, node


def test_large_hidden_on_fast_link_is_split_without_a_budget() -> None:
    """The contrast to the tiny case: at n_embd=4096 splitting pays even with memory to spare."""
    model, inputs = _big_gpt(8, 1024)
    plan = autotp.plan(model, inputs, mesh_shape=(4,), hardware="h100-sxm", training=False)
    split = [n for n in plan.nodes if n.op.startswith("aten.linear") and _block_of(n.module_path) is not None and n.strategy.axis(0).output != R]
    assert len(split) == 6 * N_LAYER


def test_plan_is_deterministic() -> None:
    model, inputs = build_example("llama", device="meta")
    budget = _param_nbytes(model) * STATE_FACTOR[True] // 2
    first = autotp.plan(model, inputs, mesh_shape=(4,), hardware="cpu-gloo", memory_budget=budget)
    second = autotp.plan(model, inputs, mesh_shape=(4,), hardware="cpu-gloo", memory_budget=budget)
    assert [(n.name, n.strategy) for n in first.nodes] == [(n.name, n.strategy) for n in second.nodes]


def test_meta_model_plans_without_allocating() -> None:
    model, inputs = _big_gpt(8, 1024)
    assert all(p.is_meta for p in model.parameters())
    plan = autotp.plan(model, inputs, mesh_shape=(8,), hardware="h100-sxm", memory_budget="8GiB")
    assert plan.memory_nbytes_per_device <= 8 * 2**30
    assert plan.tp_size == 8


def test_memory_budget_is_respected_and_tightest_budget_fits() -> None:
    model, inputs = build_example("gpt", device="meta")
    for training in (False, True):
        result = plan_model(model, inputs, mesh_shape=(4,), hardware="cpu-gloo", memory_budget=None, training=training)
        floor = int(min_state_nbytes(result.space, CostModel(resolve_hardware("cpu-gloo"), 4, training=training, optimizer="adamw"))) + 1
        plan = autotp.plan(model, inputs, mesh_shape=(4,), hardware="cpu-gloo", memory_budget=floor, training=training)
        assert plan.memory_nbytes_per_device <= floor
        assert plan.param_nbytes_per_device < plan.replicated_param_nbytes
        if training:  # weights, gradients and two fp32 AdamW moments per element
            assert plan.memory_nbytes_per_device == pytest.approx(4 * plan.param_nbytes_per_device)


def test_indivisible_dims_are_not_split() -> None:
    """LLaMA with 2 KV heads on 4 ranks: no strategy splits the KV head dim; 6-wide hidden neither."""
    model, inputs = build_example("llama", device="meta", n_heads=4, n_kv_heads=2)
    result = plan_model(model, inputs, mesh_shape=(4,), hardware="h100-sxm", memory_budget=None)
    for node in result.space.nodes:
        metas = list(node.slot_metas) + ([node.output_meta] if hasattr(node.output_meta, "shape") else [])
        for strategy in (s.axis(0) for s in node.strategies):
            placements = list(strategy.inputs) + ([strategy.output] if not isinstance(strategy.output, tuple) else [])
            for placement, meta in zip(placements, metas):
                if isinstance(placement, Shard):
                    assert meta.shape[placement.dim] % 4 == 0, (node.name, strategy)
    mlp, mlp_inputs = build_example("mlp", device="meta", d_model=64, d_hidden=6)
    space = plan_model(mlp, mlp_inputs, mesh_shape=(4,), hardware="h100-sxm", memory_budget=None).space
    fc1_weight = next(n for n in space.nodes if n.kind is NodeKind.STATE and n.output_meta.shape == (6, 64))
    assert [s.axis(0).output for s in fc1_weight.strategies] == [R, Shard(1)]


def test_summary_lists_splits_and_totals(megatron_case) -> None:
    text = megatron_case[0].plan.summary()
    assert "all_reduce" in text and "blocks.0.attn.q_proj" in text
    assert "parameter memory per device" in text and "estimated time" in text


def test_training_and_inference_plans_differ() -> None:
    """Forward only, splitting the batch costs one final gather; in training it would all-reduce
    every weight gradient, so the training plan splits the weights Megatron-style instead."""
    model, inputs = build_example("gpt", device="meta", batch=8, seq=512, n_embd=1024, n_head=16, n_layer=N_LAYER, vocab_size=1024, block_size=512)
    inference = autotp.plan(model, inputs, mesh_shape=(4,), hardware="h100-sxm", training=False)
    training = autotp.plan(model, inputs, mesh_shape=(4,), hardware="h100-sxm", training=True)
    for block in range(N_LAYER):
        for suffix in ("attn.q_proj", "mlp.c_fc", "attn.c_proj", "mlp.c_proj"):
            batch_split = _linear(inference, suffix, block).strategy.axis(0)
            assert batch_split.inputs[1] == R and batch_split.output == Shard(0), (suffix, batch_split)
        assert _linear(training, "attn.q_proj", block).strategy.axis(0).inputs[1] == Shard(0)
        assert _linear(training, "mlp.c_proj", block).strategy.axis(0).output == P
    grad_syncs = [c for _, c in training.collectives(backward=True) if c.backward_only]
    assert grad_syncs and not inference.collectives()[:-1]  # inference: one final gather
    # the batch-split weights' gradient syncs are in its graph, listed but not priced: no gradient is expected
    assert all(not c.priced and c.seconds == 0 for _, c in inference.collectives(backward=True) if c.backward_only)
