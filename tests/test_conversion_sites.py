"""The plan lists exactly the collectives the rewritten graph runs (``autotp.comm.conversions``).

Offline: each model is planned on a meta device under a memory budget that forces splits, the
rank-0 graph is rewritten (no process group is needed to build it) and its conversion nodes are
read back, independently of the rewriter's own tables, and compared with the plan's entries:
forward steps (kind, dims, value, count), gradient all-reduces, and the conjugate steps
backward runs, with the ones the plan prices.
"""
from __future__ import annotations

import operator
import random
from collections import Counter

import pytest
import torch
from torch import fx, nn

from autotp.capture.export import capture
from autotp.comm import collectives
from autotp.comm.conversions import conversion_sites, needs_grad_sync
from autotp.comm.redistribute import Step, StepKind, backward_steps, grad_sync_step
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.ir.placement import R, Shard
from autotp.ir.plan import Plan
from autotp.ir.values import ValueRef
from autotp.rewrite.rewriter import rewrite
from autotp.solve.build import build_plan
from autotp.solve.ilp import solve
from autotp.solve.memory import min_state_nbytes, state_nbytes
from autotp.strategies.engine import NodeKind, StrategySpace, build_strategy_space
from autotp.testing import run_on_ranks

TP = 2
GRAD_SYNC = grad_sync_step(0)  # the plans here are for a 1-D mesh


def _plan(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, training: bool, squeeze: float = 0.3) -> tuple[fx.GraphModule, StrategySpace, Plan]:
    """Plan under a budget ``squeeze`` of the way from the smallest state to all-replicated (forces splits)."""
    captured = capture(model, inputs)
    space = build_strategy_space(captured, TP)
    cost = CostModel(resolve_hardware("h100-sxm"), TP, training=training, optimizer="adamw" if training else None)
    floor = min_state_nbytes(space, cost)
    replicated = sum(state_nbytes(n, (R,), cost) for n in space.nodes if n.kind is NodeKind.STATE)
    budget = int(floor + squeeze * (replicated - floor)) + 1
    plan = build_plan(space, solve(space, cost, memory_budget=budget).chosen(space), cost, hardware="h100-sxm", memory_budget=budget)
    return rewrite(captured, space, plan, coordinate=(0,), group_names=("offline",)), space, plan


# --- reading the graph back ------------------------------------------------------------------
def _graph_step(node: fx.Node) -> Step | None:
    """The table step a rewritten node runs, decoded from its call (None: not a conversion)."""
    t, a = node.target, node.args
    if t is collectives.all_reduce:
        return Step(StepKind.ALL_REDUCE)
    if t is collectives.all_gather:
        return Step(StepKind.ALL_GATHER, src_dim=a[1])
    if t is collectives.reduce_scatter:
        return Step(StepKind.REDUCE_SCATTER, dst_dim=a[1])
    if t is collectives.all_to_all:
        return Step(StepKind.ALL_TO_ALL, src_dim=a[1], dst_dim=a[2])
    if t is collectives.local_chunk:
        return Step(StepKind.LOCAL_CHUNK, dst_dim=a[1])
    if t is collectives.to_partial:
        return Step(StepKind.TO_PARTIAL)
    return None


def _root(node: fx.Node, placeholders: dict[str, str]) -> ValueRef:
    """The value a conversion chain starts from: through conversions and getitems to its producer.
    ``placeholders`` maps the rewritten graph's placeholder names to the captured ones (fx renames
    a placeholder called like a builtin, e.g. ``input`` -> ``input_1``)."""
    while _graph_step(node) is not None or node.target in (collectives.grad_all_reduce, collectives.wait):
        node = node.args[0]  # type: ignore[assignment]
    if node.op == "call_function" and node.target is operator.getitem and node.args[0].target is not collectives.linears_with_grad_sync:  # type: ignore[union-attr]
        inner = _root(node.args[0], placeholders)  # type: ignore[arg-type]
        return ValueRef(inner.node, node.args[1])  # type: ignore[arg-type]
    return ValueRef(placeholders.get(node.name, node.name))


def _canonical(ref: ValueRef, space: StrategySpace) -> ValueRef:
    """A plan value read through a getitem node, named as its producer's output (the graph's view)."""
    nodes = space.by_name()
    while ref.index is None and nodes[ref.node].op == "getitem":
        ref = nodes[ref.node].slots[0]
    return ref


def assert_plan_lists_the_graphs_collectives(gm: fx.GraphModule, space: StrategySpace, plan: Plan) -> Counter:
    forward, syncs, conjugates = Counter(), Counter(), Counter()
    rewritten = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    placeholders = dict(zip(rewritten, [n.name for n in space.nodes if n.op == "placeholder"], strict=True))
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        step = _graph_step(node)
        if step is not None:
            forward[(_root(node, placeholders), step)] += 1
            conjugates.update((_root(node, placeholders), b) for b in backward_steps(step))
        elif node.target in (collectives.grad_all_reduce, collectives.linears_with_grad_sync):  # fused: the sync of its input
            syncs[_root(node if node.target is collectives.grad_all_reduce else node.args[0], placeholders)] += 1
    spaces = space.by_name()
    planned, planned_syncs, priced = Counter(), Counter(), Counter()
    for _, c in plan.conversions():
        ref = _canonical(c.value, space)
        requires_grad = spaces[c.value.node].requires_grad
        if c.backward_only:
            planned_syncs[ref] += 1
            assert c.steps == (GRAD_SYNC,) and c.src == c.dst == (R,)
            assert c.priced == (plan.training and requires_grad), (c, plan.training, requires_grad)
        else:
            planned.update((ref, s) for s in c.steps)
            if plan.training and requires_grad:
                priced.update((ref, b) for s in c.steps for b in backward_steps(s))
    assert forward == planned, f"graph runs {forward - planned}, plan lists {planned - forward} in addition"
    assert syncs == planned_syncs, f"graph syncs {syncs - planned_syncs}, plan lists {planned_syncs - syncs} in addition"
    assert not priced - conjugates, f"the plan prices backward steps the graph does not run: {priced - conjugates}"
    assert sum(forward.values()) + sum(syncs.values()) > 0, "the budget forced no conversion: the check would be empty"
    return forward + Counter({(ref, GRAD_SYNC): k for ref, k in syncs.items()})


# --- the built-in examples ---------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("example", ["mlp", "gpt", "llama"])
def test_examples_plan_lists_every_collective_the_graph_runs(example: str, training: bool) -> None:
    model, inputs = build_example(example, device="meta", batch=2, seq=16)
    gm, space, plan = _plan(model, inputs, training=training)
    assert plan.sharded_state(), "the budget must force a split"
    assert_plan_lists_the_graphs_collectives(gm, space, plan)


def test_mlp_grad_syncs_the_drift_left_out_are_listed_unpriced() -> None:
    """The MLP's input and residual are read as R by split work: their gradient syncs run in the
    graph in inference too (a backward through it, inputs with requires_grad), listed at no price."""
    model, inputs = build_example("mlp", device="meta", batch=2, seq=16)
    gm, space, plan = _plan(model, inputs, training=False)
    syncs = [c for _, c in plan.conversions() if c.backward_only]
    graph_syncs = [n for n in gm.graph.nodes if n.target in (collectives.grad_all_reduce, collectives.linears_with_grad_sync)]
    assert syncs and len(syncs) == len(graph_syncs)
    assert all(not c.priced and c.seconds == 0.0 and c.bytes_per_rank == 0.0 for c in syncs)
    assert all(c.kind == "grad_all_reduce (only if a gradient flows)" for c in syncs)
    assert plan.comm_seconds == sum(c.seconds for _, c in plan.conversions() if not c.backward_only)


def test_training_prices_the_syncs_of_values_that_need_a_gradient() -> None:
    """Llama's rotary tables (cos, sin) need no gradient: their syncs are listed at no price."""
    model, inputs = build_example("llama", device="meta", batch=2, seq=16)
    _, space, plan = _plan(model, inputs, training=True, squeeze=0.1)
    spaces = space.by_name()
    syncs = [c for _, c in plan.conversions() if c.backward_only]
    assert any(c.priced for c in syncs) and any(not c.priced for c in syncs)
    for c in syncs:
        assert c.priced == spaces[c.value.node].requires_grad
        assert (c.seconds > 0) == c.priced


def test_sites_follow_the_dedup_rules() -> None:
    """One conversion per (value, target placement), one sync per value, each at its first reader."""
    model, inputs = build_example("gpt", device="meta", batch=2, seq=16)
    _, space, plan = _plan(model, inputs, training=True)
    chosen = {n.name: n.strategy for n in plan.nodes}
    sites = conversion_sites(space, chosen, training=True)
    keys = [(s.value, getattr(s, "dst", "sync")) for s in sites]
    assert len(keys) == len(set(keys))
    order = [n.name for n in space.nodes]
    for site in sites:
        assert [order.index(node) for node, _ in site.readers] == sorted(order.index(node) for node, _ in site.readers)
        for node, slot in site.readers:
            assert space.by_name()[node].slots[slot] == site.value
            if not hasattr(site, "dst"):
                assert needs_grad_sync(chosen[node], slot, space.by_name()[node].slot_metas[slot])


# --- Hugging Face models ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hf_models_plan_lists_every_collective_the_graph_runs(name: str) -> None:
    pytest.importorskip("transformers")
    from tests._hf_fns import build_hf_model

    model, inputs = build_hf_model(name)
    gm, space, plan = _plan(model, inputs, training=name != "bert")
    assert plan.sharded_state()
    assert_plan_lists_the_graphs_collectives(gm, space, plan)


# --- seeded random models -------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        return x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class _Mlp(nn.Module):
    def __init__(self, d: int, hidden: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(nn.functional.gelu(self.up(self.norm(x))))
        return x + y if self.residual else y


def random_model(seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A seeded stack of MLP and attention blocks with random widths, and a (B, T, d) input."""
    rng = random.Random(seed)
    d = rng.choice([8, 16, 24])
    with torch.device("meta"):
        blocks: list[nn.Module] = [nn.Linear(rng.choice([4, 8]), d)]
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                blocks.append(_Attention(d, rng.choice([2, 4])))
            else:
                blocks.append(_Mlp(d, rng.choice([16, 32, 48]), residual=rng.random() < 0.7))
        blocks.append(nn.Linear(d, rng.choice([4, 6, 8])))
    model = nn.Sequential(*blocks)
    return model, (torch.empty(2, 4, blocks[0].in_features, device="meta"),)


@pytest.mark.parametrize("seed", range(24))
def test_random_models_plan_lists_every_collective_the_graph_runs(seed: int) -> None:
    model, inputs = random_model(seed)
    gm, space, plan = _plan(model, inputs, training=seed % 2 == 0, squeeze=0.1 + 0.05 * (seed % 5))
    assert any(isinstance(p, Shard) for placements in plan.sharded_state().values() for p in placements)
    assert_plan_lists_the_graphs_collectives(gm, space, plan)


# --- the autograd conjugates against the table --------------------------------------------------
@pytest.mark.timeout(240)
def test_each_collectives_backward_is_the_tables_conjugate() -> None:
    """On 2 gloo ranks, each autograd collective's backward equals running its
    ``redistribute.backward_steps`` (what the planner prices) on the same gradient."""
    from tests import _conversion_fns as fns

    results = run_on_ranks(fns.conjugate_cases, 2, timeout_seconds=200)
    names = [name for name, _, _ in results[0]]
    assert names == [*(str(s) for s in fns.STEPS), "grad_all_reduce"]
    assert {s.kind for s in fns.STEPS} == set(StepKind)
    for rank, cases in enumerate(results):
        for name, autograd, table in cases:
            torch.testing.assert_close(autograd, table, rtol=0, atol=0, msg=lambda m, name=name, rank=rank: f"{name} on rank {rank}: {m}")
