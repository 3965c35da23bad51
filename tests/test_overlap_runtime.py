"""Communication beside computation (issue 23): the rank-local graph runs ``autotp.comm.overlap``'s
schedule, and its numbers are the blocking graph's.

Async collectives and the fused column-parallel linears are checked against their blocking
counterparts on gloo ranks; the schedule's positions offline on a pinned plan (a rank-local graph
is built without a process group); the GPT and LLaMA examples end to end against the unsharded
model, with overlap on and off.
"""
from __future__ import annotations

import pytest
import torch
from torch import fx

from autotp.comm import collectives
from autotp.comm.conversions import conversion_sites
from autotp.comm.overlap import overlap_schedule
from autotp.rewrite.rewriter import collective_nodes, rewrite
from autotp.testing import run_on_ranks
from tests import _overlap_runtime_fns as fns

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_async_collectives_equal_blocking_ones_forward_and_backward(world_size: int) -> None:
    results = run_on_ranks(fns.async_matches_blocking, world_size, timeout_seconds=120)
    for rank, cases in enumerate(results):
        assert [name for name, *_ in cases] == [name for name, _, _ in fns._cases()]
        for name, out_error, grad_error, inference_error in cases:
            assert out_error == 0.0 and grad_error == 0.0 and inference_error == 0.0, (rank, name, out_error, grad_error, inference_error)


def test_fused_contractions_equal_marker_and_plain_ops_and_sync_beside_weight_grads() -> None:
    results = run_on_ranks(fns.fused_linears_match_marker_path, 2, timeout_seconds=120)
    for rank, r in enumerate(results):
        assert r["grad_count"] == 1 + 4 + 2, r  # x, four weights (linear, linear, addmm, mm), two biases
        assert r["out_error"] == 0.0 and r["inference_error"] == 0.0, (rank, r)
        assert r["grad_error"] < 1e-5, (rank, r)
        # the all-reduce of grad x starts before the four weight gradients, its wait after them
        assert r["order"] == ["start", *["weight grad"] * 4, "wait"], (rank, r["order"])


def _call(gm: fx.GraphModule, target: object) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_wait_nodes_sit_after_independent_compute_in_the_rank_local_graph() -> None:
    captured, space, plan = fns.fork_plan(2)
    gm = rewrite(captured, space, plan, coordinate=(0,), group_names=("offline",))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    (start,) = collective_nodes(gm)
    assert start.target is collectives.all_reduce and start.kwargs == {"async_op": True}
    (wait,) = _call(gm, collectives.wait)
    assert list(start.users) == [wait]
    row, other = _call(gm, torch.ops.aten.linear.default)  # capture order: row, then other
    (add,) = wait.users
    assert start.args[0] is row and row not in other.all_input_nodes  # other does not need the all-reduce
    assert order[row] < order[start] < order[other] < order[wait] < order[add], list(gm.graph.nodes)
    # the schedule the plan is priced by says the same
    sites = conversion_sites(space, {n.name: n.strategy for n in plan.nodes}, training=plan.training)
    assert list(overlap_schedule(space, sites).forward.values()) == [("linear_1",)]

    blocking = rewrite(captured, space, plan, coordinate=(0,), group_names=("offline",), overlap=False)
    assert not _call(blocking, collectives.wait)
    (call,) = collective_nodes(blocking)
    assert call.kwargs == {} and list(call.users)[0].name == add.name


def test_gpt_and_llama_with_overlap_equal_the_unsharded_model() -> None:
    results = run_on_ranks(fns.examples_match_unsharded, 2, ["gpt", "llama"], timeout_seconds=280)
    for rank, report in enumerate(results):
        for key, r in report.items():
            assert r["out_error"] < 1e-5 and r["grad_error"] < 1e-4 and r["param_error"] < 1e-4, (rank, key, r)
            if key.endswith("overlap=True"):
                assert r["async_starts"] > 0 and r["async_starts"] == r["waits"] and r["fused"] > 0, (rank, key, r)
                assert r["fused_kinds"] == ["linear"], (rank, key, r)
            else:
                assert r["async_starts"] == r["waits"] == r["fused"] == 0 and r["markers"] > 0, (rank, key, r)


def test_hf_gpt2_conv1d_addmm_fuses_and_equals_the_unsharded_model() -> None:
    """Hugging Face's GPT-2 projects with ``Conv1D`` (``addmm(b, x, W)``, ``W`` (in, out)): its
    column-parallel ``c_fc`` fuses with its gradient sync as an addmm reader."""
    pytest.importorskip("transformers")
    results = run_on_ranks(fns.examples_match_unsharded, 2, ["hf:gpt2"], timeout_seconds=280)
    for rank, report in enumerate(results):
        on, off = report["hf:gpt2 overlap=True"], report["hf:gpt2 overlap=False"]
        for r in (on, off):
            assert r["out_error"] < 1e-5 and r["grad_error"] < 1e-4 and r["param_error"] < 1e-4, (rank, r)
        assert on["fused"] > 0 and "addmm" in on["fused_kinds"] and off["fused"] == 0, (rank, on, off)


def _between(gm: fx.GraphModule, start: fx.Node, wait: fx.Node) -> list[str]:
    nodes = list(gm.graph.nodes)
    return [n.name for n in nodes[nodes.index(start) + 1:nodes.index(wait)]]


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("example", ["mlp", "gpt", "llama"])
def test_each_start_runs_beside_exactly_the_nodes_the_schedule_prices(example: str, training: bool) -> None:
    """Offline, on rank 0's graph of a plan forced to split: the captured nodes between each
    start and its wait are the site's ``OverlapSchedule.forward`` entry, in order, and only one
    collective is in flight at a time."""
    captured, space, plan = fns.squeezed_plan(example, training=training)
    gm = rewrite(captured, space, plan, coordinate=(0,), group_names=("offline",))
    sites = conversion_sites(space, {n.name: n.strategy for n in plan.nodes}, training=plan.training)
    schedule = overlap_schedule(space, sites)
    emitted = {n.name for n in space.nodes}
    waits = _call(gm, collectives.wait)
    assert len(waits) == len(schedule.forward) > 0
    beside = []
    for wait in waits:
        (start,) = wait.all_input_nodes
        assert list(start.users) == [wait] and start.kwargs == {"async_op": True}
        between = _between(gm, start, wait)
        assert not any(n in {c.name for c in collective_nodes(gm)} for n in between), between  # one in flight
        beside.append(tuple(n for n in between if n in emitted))
    expected = [tuple(n for n in names if n in {m.name for m in gm.graph.nodes}) for names in schedule.forward.values()]
    assert beside == expected
    if training and example != "mlp":
        assert any(beside), "no start has compute beside it: the check would be weak"
    assert len(_call(gm, collectives.linears_with_grad_sync)) == len(schedule.weight_grads)


def test_fused_linears_under_autocast_give_the_blocking_graphs_gradients() -> None:
    """Regression: under bfloat16 autocast the fused linears' backward mixed a bfloat16 gradient
    with the float32 weight (a dtype error); it must compute what autograd's casts do."""
    for rank, r in enumerate(run_on_ranks(fns.autocast_overlap_matches_blocking, 2, timeout_seconds=120)):
        assert r["fused"] > 0 and r["grad_dtypes"] == ["torch.float32"], (rank, r)
        assert r["logit_error"] == 0.0 and r["grad_error"] < 1e-3, (rank, r)
