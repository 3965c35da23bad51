"""Mixture-of-experts: the routing rules (``autotp/strategies/rules/routing.py``) and toy
Mixtral / Qwen2-MoE models split on real gloo ranks.

- every strategy of the routing ops (topk, sort, argsort, histc, floor_divide, the grouped
  expert matmuls) checked by brute force on 2, 3 and 4 ranks, with the splits each must offer;
- both captured models: no routing op without a rule, every strategy of every node checked on
  2, 3 and 4 ranks, the 3-D expert weights offered a split, the ``[gate; up]`` chunk never split
  along the chunked dim;
- end to end on 2 ranks, training: the budget forces every divisible weight to be split (the
  attention projections and Qwen2's shared expert included); logits, every gradient and the
  parameters after one AdamW step equal the unsharded model's.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from autotp.capture.export import CapturedGraph, capture
from autotp.ir.placement import P, R, Shard
from autotp.rewrite.rule_check import check_graph, check_strategy, node_values
from autotp.strategies.engine import NodeKind, NodeSpace, UnsupportedOpWarning, build_strategy_space
from autotp.strategies.rules.registry import RULES, OpStrategy, lookup, register
from autotp.testing import run_on_ranks
from tests import _moe_fns
from tests._rule_fns import Call

TP_SIZES = (2, 3, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))


OFFS = torch.tensor([5, 12, 12, 24])  # expert 2 gets no rows
CASES: dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...]]] = {
    "topk_last": (lambda x: torch.topk(x, 3), (_randn(12, 24),)),
    "topk_first_smallest": (lambda x: torch.topk(x, 2, dim=0, largest=False), (_randn(12, 24, 12),)),
    "sort_descending": (lambda x: torch.sort(x, dim=1, descending=True), (_randn(12, 24, 12),)),
    "sort_stable": (lambda x: torch.sort(x, dim=0, stable=True), (_randn(12, 24),)),
    "argsort": (lambda x: torch.argsort(x, dim=-1), (_randn(12, 24),)),
    "histc": (lambda x: torch.histc(x, bins=6, min=-1.0, max=1.0), (_randn(24, 12),)),
    "histc_data_range": (lambda x: torch.histc(x, bins=6), (_randn(24, 12),)),
    "floor_divide": (lambda x, y: torch.floor_divide(x, y), (_randn(12, 24) * 10, _randn(24) + 3)),
    "floor_divide_ints": (lambda i: i // 2, (torch.arange(48).reshape(12, 4),)),
}


@functools.cache
def _case(name: str, tp_size: int) -> tuple[CapturedGraph, dict[str, Any], list[NodeSpace]]:
    fn, inputs = CASES[name]
    model = Call(fn)
    captured = capture(model, inputs)
    space = build_strategy_space(captured, tp_size)
    return captured, node_values(captured, model, inputs), [n for n in space.nodes if n.kind is NodeKind.OP]


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_every_routing_strategy(name: str, tp_size: int) -> None:
    captured, values, _ = _case(name, tp_size)
    checked, failures = check_graph(captured, values, tp_size=tp_size)
    assert checked > 0 and not failures, "\n".join(str(f) for f in failures)


def _strategies(name: str, tp_size: int, op: str) -> tuple[OpStrategy, ...]:
    (node,) = [n for n in _case(name, tp_size)[2] if n.op.startswith(op)]
    return _rule_view(node)


def _rule_view(space: NodeSpace) -> tuple[OpStrategy, ...]:
    """A node's strategies on a 1-D mesh as its rule states them."""
    return tuple(st.axis(0) for st in space.strategies)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_routing_ops_offer_their_splits(tp_size: int) -> None:
    s = Shard
    assert OpStrategy((s(0),), (s(0), s(0))) in _strategies("topk_last", tp_size, "aten.topk")
    assert OpStrategy((s(1),), (s(1), s(1))) not in _strategies("topk_last", tp_size, "aten.topk")  # the top-k dim
    first = _strategies("topk_first_smallest", tp_size, "aten.topk")
    assert OpStrategy((s(2),), (s(2), s(2))) in first and OpStrategy((s(0),), (s(0), s(0))) not in first
    descending = _strategies("sort_descending", tp_size, "aten.sort")
    assert OpStrategy((s(0),), (s(0), s(0))) in descending and OpStrategy((s(1),), (s(1), s(1))) not in descending
    assert OpStrategy((s(1),), (s(1), s(1))) in _strategies("sort_stable", tp_size, "aten.sort")  # dim by keyword
    assert OpStrategy((s(0),), s(0)) in _strategies("argsort", tp_size, "aten.argsort")
    histc = _strategies("histc", tp_size, "aten.histc")
    assert OpStrategy((s(0),), P) in histc and OpStrategy((s(1),), P) in histc
    assert len(_strategies("histc_data_range", tp_size, "aten.histc")) == 1  # per-rank ranges differ: R only
    divide = _strategies("floor_divide", tp_size, "aten.floor_divide")
    assert OpStrategy((s(0), R), s(0)) in divide and OpStrategy((s(1), s(0)), s(1)) in divide
    assert not any(p == P for st in divide for p in (*st.inputs, *st.outputs()))


# --- the grouped expert matmuls -----------------------------------------------------------------

def _grouped_space(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], tp_size: int) -> tuple[CapturedGraph, dict[str, Any], NodeSpace, fx.Node]:
    """The captured ``fn``, its node values, and the space and node of its one grouped matmul."""
    model = Call(fn)
    captured = capture(model, inputs)
    (space,) = [n for n in build_strategy_space(captured, tp_size).nodes if "grouped_mm" in n.op]
    (node,) = [n for n in captured.graph_module.graph.nodes if n.name == space.name]
    return captured, node_values(captured, model, inputs), space, node


COLUMN, ROW = OpStrategy((R, Shard(2), R), Shard(1)), OpStrategy((Shard(1), Shard(1), R), P)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_transformers_grouped_mm_fallback(tp_size: int) -> None:
    """x[S, k] @ w[E, k, n] by groups of rows: column and row splits, checked in float32."""
    pytest.importorskip("transformers.integrations.moe")
    op = torch.ops.transformers.grouped_mm_fallback
    captured, values, node, _ = _grouped_space(lambda x, w, o: op(x, w, offs=o), (_randn(24, 48), _randn(4, 48, 36), OFFS), tp_size)
    strategies = _rule_view(node)
    assert COLUMN in strategies and ROW in strategies
    assert not any(st.inputs[0] == Shard(0) or st.inputs[2] != R for st in strategies)  # offs: global row numbers
    checked, failures = check_graph(captured, values, tp_size=tp_size)
    assert checked == len(strategies) and not failures, "\n".join(str(f) for f in failures)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_torch_grouped_mm(tp_size: int) -> None:
    """``aten._grouped_mm`` takes bfloat16 only. Small integers keep every product and sum exact,
    so the split strategies compare exactly; P inputs (random bfloat16 summands) cannot. Its
    kernel wants 16-byte row strides: 48 bfloat16 split in 4 (24 bytes) is not offered."""
    ints = functools.partial(torch.randint, -2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    for fn, inputs, column, row in (
        (lambda x, w, o: F.grouped_mm(x, w, offs=o), (ints((24, 48)), ints((4, 48, 48)), OFFS.int()), COLUMN, ROW),
        (lambda x, w: F.grouped_mm(x, w), (ints((4, 12, 48)), ints((4, 48, 48))), OpStrategy((R, Shard(2)), Shard(2)), OpStrategy((Shard(2), Shard(1)), P)),
    ):
        _, values, space, node = _grouped_space(fn, inputs, tp_size)
        strategies = _rule_view(space)
        assert (column in strategies and row in strategies) == (tp_size != 4), strategies
        for strategy in [st for st in strategies if P not in st.inputs]:
            reason = check_strategy(node, space, strategy, values, tp_size=tp_size, generator=torch.Generator().manual_seed(0))
            assert reason is None, (strategy, reason)


def test_third_party_op_registered_by_name() -> None:
    """A ``"namespace::op"`` string finds every overload of the op, without importing its library."""
    lib = torch.library.Library("autotp_moe_test", "DEF")  # noqa: F841 -- kept alive for the test
    lib.define("scale(Tensor x) -> Tensor")
    lib.define("scale.twice(Tensor x) -> Tensor")
    ops = torch.ops.autotp_moe_test.scale
    assert lookup(ops.default) is None
    register("autotp_moe_test::scale")(lambda ctx: iter(()))
    try:
        assert lookup(ops.default) is RULES["autotp_moe_test::scale"] is lookup(ops.twice)
        assert lookup(torch.ops.aten.add.Tensor) is not RULES["autotp_moe_test::scale"]
    finally:
        del RULES["autotp_moe_test::scale"]


# --- the models -----------------------------------------------------------------------------------

@functools.cache
def _captured_model(name: str) -> tuple[CapturedGraph, dict[str, Any]]:
    pytest.importorskip("transformers")
    model, inputs = _moe_fns.build_moe_model(name)
    captured = capture(model, inputs)
    return captured, node_values(captured, model, inputs)


@pytest.mark.parametrize("name", _moe_fns.MODELS)
def test_moe_model_space(name: str) -> None:
    captured, values = _captured_model(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnsupportedOpWarning)
        space = build_strategy_space(captured, 2)
    # index_put_ writes in place: pinned replicated (autotp/strategies/mutation.py) whether or not it has a rule
    assert set(space.unsupported_ops) <= {"aten.index_put_.default"}, space.unsupported_ops
    assert all("index_put_" in str(w.message).split("(first:")[0] for w in caught if issubclass(w.category, UnsupportedOpWarning))
    ops = {n.op for n in space.nodes if n.kind is NodeKind.OP}
    assert {"aten.topk.default", "aten.sort.default", "aten.histc.default", "aten.floor_divide.default", "transformers.grouped_mm_fallback.default"} <= ops
    for param in ("gate_up_proj", "down_proj"):  # the 3-D expert weights: a whole-tensor split is offered
        (placeholder,) = [n for n in space.nodes if n.op == "placeholder" and n.name.endswith(f"experts_{param}")]
        assert any(isinstance(st.output, Shard) for st in _rule_view(placeholder)), (param, placeholder.strategies)
    grouped = [_rule_view(n) for n in space.nodes if "grouped_mm" in n.op]
    assert len(grouped) == 2 and all(COLUMN in g and ROW in g for g in grouped)
    (chunk,) = [_rule_view(n) for n in space.nodes if n.op.startswith("aten.chunk")]  # [gate; up] halves of the last dim
    assert len(chunk) > 1 and not any(Shard(1) in st.inputs for st in chunk), chunk


@pytest.mark.filterwarnings("ignore:autotp has no sharding rule for aten.index_put_")  # in place: pinned replicated
@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("name", _moe_fns.MODELS)
def test_every_strategy_of_every_moe_node(name: str, tp_size: int) -> None:
    captured, values = _captured_model(name)
    checked, failures = check_graph(captured, values, tp_size=tp_size)
    assert checked > 0 and not failures, "\n".join(str(f) for f in failures)


@pytest.mark.timeout(300)
def test_moe_models_train_equal_to_original() -> None:
    pytest.importorskip("transformers")
    reports = run_on_ranks(_moe_fns.moe_training_equivalence, 2, list(_moe_fns.MODELS), 0.01, timeout_seconds=240)
    for rank, report in enumerate(reports):
        for name, r in report.items():
            assert r["logits_error"] <= 1e-5 * max(1.0, r["logits_scale"]), (rank, name, r["logits_error"])
            assert max(r["grad_errors"].values()) <= 1e-5, (rank, name, r["grad_errors"])
            reference, sharded = r["losses"]
            assert abs(reference - sharded) <= 1e-5, (rank, name, r["losses"])
            assert max(r["param_errors"].values()) <= 1e-4, (rank, name, r["param_errors"])
            split = {n for n, p in r["placements"].items() if p != "R"}
            for n, shape in r["local_shapes"].items():  # the local shape is the split one
                assert (n in split) == (shape != r["full_shapes"][n]), (n, shape, r["placements"][n])
            attention = [n for n in r["full_shapes"] if any(f"self_attn.{proj}.weight" in n for proj in _moe_fns.ATTENTION)]
            assert len(attention) == 4 and set(attention) <= split, (name, {n: r["placements"][n] for n in attention})
            dense = [n for n in r["full_shapes"] if "shared_expert." in n]
            assert set(dense) <= split, (name, {n: r["placements"][n] for n in dense})
            assert len(dense) == (3 if name == "qwen2_moe" else 0)
            experts = [n for n in r["full_shapes"] if ".experts." in n]  # the budget leaves no room for them whole
            assert len(experts) == 2 and set(experts) <= split, (name, {n: r["placements"][n] for n in experts})
