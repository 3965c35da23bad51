"""The brute-force rule checker's own blind spots (``autotp.rewrite.rule_check``), one regression
test each: values written in place, Python scalar outputs, sparse tensors, inf/NaN, complex
values and half-precision rounding. Each failed, crashed or checked nothing before its fix."""
from __future__ import annotations

import pytest
import torch

from autotp.ir.placement import P, Partial, R, Shard
from autotp.rewrite.rule_check import _close, _compare, _split, check_graph, check_nodes, check_strategy
from autotp.strategies.engine import NodeKind, build_strategy_space
from autotp.strategies.rules.registry import OpStrategy
from tests._rule_fns import captured_with_values

aten = torch.ops.aten
INF, NAN = float("inf"), float("nan")


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::autotp.strategies.engine.UnsupportedOpWarning")]


def _in_place(x: torch.Tensor) -> torch.Tensor:
    y = x + 1
    y.mul_(2)
    return y * 3


@pytest.mark.parametrize("tp_size", [2, 3, 4])
def test_values_written_in_place_are_recorded_before_the_write(tp_size: int) -> None:
    """``add``'s value is what ``add`` returned, not what ``mul_`` made of it later; and checking
    ``mul_`` on one rank neither reaches another rank's input nor the recorded values."""
    x = torch.randn(12, 24)
    captured, values = captured_with_values(_in_place, x)
    assert any(n.target is aten.mul_.Tensor for n in captured.graph_module.graph.nodes)
    torch.testing.assert_close(values["add"], x + 1)
    checked, failures = check_graph(captured, values, tp_size=tp_size)
    assert checked >= 3 and failures == []
    torch.testing.assert_close(values["add"], x + 1)


def test_python_scalar_outputs_are_replicated_values() -> None:
    """``aten.item`` returns a float: checked as R (every rank the same value), not a crash."""
    captured, values = captured_with_values(lambda x: x * x.max().item(), torch.randn(12, 24))
    assert isinstance(values["item"], float)
    results = {r.node: r for r in check_nodes(captured, build_strategy_space(captured, 3), values)}
    assert results["item"].checked >= 1 and results["item"].failures == ()
    assert _compare(3.0, (R,), {(0,): 3.0, (1,): 3.0}, mesh_shape=(2,), exact=True) is None
    assert "returned 4.0" in str(_compare(3.0, (R,), {(0,): 3.0, (1,): 4.0}, mesh_shape=(2,), exact=True))
    assert "only be replicated" in str(_compare(3.0, (P,), {(0,): 1.5, (1,): 1.5}, mesh_shape=(2,), exact=True))


def test_sparse_values_are_skipped_with_a_reason() -> None:
    captured, values = captured_with_values(lambda x: x * 2, torch.randn(12, 24))
    sparse = {name: v.to_sparse() if isinstance(v, torch.Tensor) else v for name, v in values.items()}
    (result,) = check_nodes(captured, build_strategy_space(captured, 2), sparse)
    assert result.checked == 0 and result.failures == () and "sparse" in str(result.skipped)
    assert check_graph(captured, sparse, tp_size=2) == (0, [])


@pytest.mark.parametrize("tp_size", [2, 3, 4])
def test_partial_inputs_holding_inf_and_nan_are_checked(tp_size: int) -> None:
    """Noise scaled by an infinite mean made every P check of such a tensor fail."""
    x = torch.randn(12, 24)
    x[0, 0], x[1, 1], x[2, 2] = INF, -INF, NAN
    captured, values = captured_with_values(lambda a: a * 2 + a, x)
    space = build_strategy_space(captured, tp_size)
    assert any(isinstance(p, Partial) for ns in space.nodes if ns.kind is NodeKind.OP for s in ns.strategies for p in s.inputs[0])
    checked, failures = check_graph(captured, values, tp_size=tp_size)
    assert checked >= 6 and failures == []


def test_partial_split_keeps_non_finite_elements_whole_on_rank_zero() -> None:
    x = torch.tensor([[1.0, INF], [NAN, -2.0]])
    parts = _split(x, (P,), (3,), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(parts[(c,)]).all() and (parts[(c,)] != 0).all() for c in (1, 2))  # noise everywhere
    assert parts[(0,)][0, 1] == INF and parts[(0,)][1, 0].isnan()
    torch.testing.assert_close(sum(parts.values()), x, equal_nan=True)


def test_a_nan_dropped_from_one_summand_is_caught() -> None:
    x = torch.tensor([[1.0, NAN, 3.0, 4.0], [NAN, 2.0, 5.0, 6.0]])
    captured, values = captured_with_values(lambda a: a.nansum(1), x)
    (ns,) = [ns for ns in build_strategy_space(captured, 2).nodes if ns.kind is NodeKind.OP]
    node = next(n for n in captured.graph_module.graph.nodes if n.name == ns.name)
    assert OpStrategy((P,), P) not in [s.axes[0] for s in ns.strategies]  # the rule does not offer it
    assert check_strategy(node, ns, OpStrategy((P,), P), values, tp_size=2, generator=torch.Generator().manual_seed(0)) is not None


def test_non_finite_outputs_compare_by_position() -> None:
    assert _close(torch.tensor([INF, NAN, 1.0, -INF]), torch.tensor([INF, NAN, 1.0, -INF]))
    assert not _close(torch.tensor([INF, 1.0]), torch.tensor([-INF, 1.0]))
    assert not _close(torch.tensor([INF, 1.0]), torch.tensor([1.0, 1.0]))
    assert not _close(torch.tensor([NAN, 1.0]), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("tp_size", [2, 3, 4])
def test_complex_values_may_be_partial_as_the_engine_allows(tp_size: int) -> None:
    z = torch.randn(12, 24, dtype=torch.complex64)
    captured, values = captured_with_values(lambda a: a * 2, z)
    (ns,) = [ns for ns in build_strategy_space(captured, tp_size).nodes if ns.kind is NodeKind.OP]
    partial = next(s for s in ns.strategies if s.inputs[0] == (P,))
    node = next(n for n in captured.graph_module.graph.nodes if n.name == ns.name)
    assert check_strategy(node, ns, partial, values, tp_size=tp_size, generator=torch.Generator().manual_seed(0)) is None
    parts = _split(z, (P,), (tp_size,), torch.Generator().manual_seed(0))
    assert parts[(1,)].imag.abs().sum() > 0  # complex noise, not real noise cast
    # a wrong P strategy of a complex op is still caught
    captured, values = captured_with_values(lambda a: a * a, z)
    (ns,) = [ns for ns in build_strategy_space(captured, tp_size).nodes if ns.kind is NodeKind.OP]
    node = next(n for n in captured.graph_module.graph.nodes if n.name == ns.name)
    wrong = OpStrategy((P, P), P)  # a product of two partial sums is not the sum of the products
    assert len(ns.slots) == 2
    assert check_strategy(node, ns, wrong, values, tp_size=tp_size, generator=torch.Generator().manual_seed(0)) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_partial_cast_to_half_precision_is_within_its_rounding(dtype: torch.dtype) -> None:
    """Each rank rounds its summand: a float32 tolerance failed every P cast to bf16/fp16; a
    wrong strategy (S of the reduced dim) still fails."""
    captured, values = captured_with_values(lambda a: (a.to(dtype), a.to(dtype).sum(-1)), torch.randn(12, 24) * 8)
    checked, failures = check_graph(captured, values, tp_size=3)
    assert checked >= 4 and failures == []
    space = build_strategy_space(captured, 3)
    ns = next(ns for ns in space.nodes if ns.op.startswith("aten.sum"))
    node = next(n for n in captured.graph_module.graph.nodes if n.name == ns.name)
    assert check_strategy(node, ns, OpStrategy((Shard(1),), Shard(0)), values, tp_size=3, generator=torch.Generator().manual_seed(0)) is not None
