"""Ops that used to crash the planner, and the SDPA layouts its rule got wrong (helper B of issue 22).

Each crash class from driving the rule checker over PyTorch's OpInfo corpus is here as the
smallest model: a multi-output pointwise op (``frexp``), an output holding a list
(``histogramdd``), ``gather`` with an empty index, a rule that raises, and ops whose output shape
depends on tensor values (``nonzero`` and kin). Each now either gets correct strategies (checked
by brute force), falls back to replication named in the one ``UnsupportedOpWarning``, or stops
capture with a ``CaptureError`` naming the op and the user's line.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autotp
from autotp.api import plan_model
from autotp.capture.export import CapturedGraph, capture
from autotp.cli import main
from autotp.ir.placement import R, Shard
from autotp.rewrite.rewriter import rewrite
from autotp.rewrite.rule_check import check_graph
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace, UnsupportedOpWarning, build_strategy_space
from autotp.strategies.rules.registry import RULES, OpStrategy, Rule
from tests._rule_fns import captured_with_values

TP_SIZES = (2, 3, 4)
aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("one_thread")


class Crashes(nn.Module):
    """One small model per case, each op written in ``forward`` itself: export records only the
    frame of the module's ``forward`` as a node's source line."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case

    def forward(self, x: torch.Tensor) -> Any:
        if self.case == "nonzero":
            return torch.nonzero(x > 0).float().sum(0)
        if self.case == "argwhere":
            return torch.argwhere(x > 0).float().sum(0)
        if self.case == "masked_select":
            return torch.masked_select(x, x > 0).sum()
        if self.case == "unique":
            return torch.unique(x.round()).sum()
        if self.case == "where":
            return torch.where(x > 0)[0].sum()
        if self.case == "tensor_split":
            return torch.tensor_split(x, torch.tensor([3, 5]))[0].sum()
        if self.case == "repeat_interleave":
            return torch.repeat_interleave(x, (x[:, 0] > 0).long() + 1, dim=0).sum()
        if self.case == "boolean_index":
            return x[x > 0].sum()
        if self.case == "histogramdd":
            h, edges = torch.histogramdd(x, bins=[3, 4])
            return h * 2, edges[1] + 1
        if self.case == "raising_rule":
            return torch.cumsum(x, 0) + torch.renorm(x, 2, 0, 1.0)
        raise ValueError(f"no case {self.case!r}")


def _line_of(code: str) -> int:
    """The line number of this file's first line containing ``code``."""
    return next(k for k, line in enumerate(open(__file__).read().splitlines(), 1) if code in line and "_line_of" not in line)


def _space(captured: CapturedGraph, tp_size: int) -> tuple[StrategySpace, list[str]]:
    """The 1-D strategy space and the texts of the ``UnsupportedOpWarning``s building it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        space = build_strategy_space(captured, tp_size)
    return space, [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)]


def _ops(space: StrategySpace, op: str) -> list[NodeSpace]:
    found = [n for n in space.nodes if n.kind is NodeKind.OP and n.op.startswith(op)]
    assert found, f"no {op} node"
    return found


def _single_axis(node: NodeSpace) -> list[OpStrategy]:
    return [s.axis(0) for s in node.strategies]


def _all_replicated(node: NodeSpace) -> bool:
    return all(p == R for s in node.strategies for placements in (*s.inputs, *s.outputs) for p in placements)


def _check(captured: CapturedGraph, values: dict[str, Any], tp_size: int) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)  # asserted where it matters
        checked, failures = check_graph(captured, values, tp_size=tp_size)
    assert not failures, "\n".join(str(f) for f in failures)
    return checked


# --- scaled_dot_product_attention: the batch-like dims come from the layout ---------------------

def _gen(*shapes: tuple[int, ...], bool_last: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen) for s in shapes]
    if bool_last:
        tensors[-1] = tensors[-1] > -0.5  # a boolean mask with no fully-masked row (almost surely)
    return tuple(tensors)


SDPA: dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...]]] = {
    # (N, L, E): dim 1 is the sequence, not heads
    "3d": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), _gen((12, 12, 8), (12, 24, 8), (12, 24, 8))),
    "3d_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), _gen((12, 12, 8), (12, 12, 8), (12, 12, 8))),
    "4d": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), _gen((12, 12, 12, 8), (12, 12, 12, 8), (12, 12, 12, 8))),
    "5d": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), _gen((12, 12, 12, 12, 4), (12, 12, 12, 12, 4), (12, 12, 12, 12, 4))),
    "gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            _gen((12, 24, 12, 8), (12, 12, 12, 8), (12, 12, 12, 8))),
    "mask_broadcast_heads": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                             _gen((12, 12, 12, 8), (12, 12, 24, 8), (12, 12, 24, 8), (12, 1, 12, 24))),
    "mask_bool_2d": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                     _gen((12, 12, 12, 8), (12, 12, 12, 8), (12, 12, 12, 8), (12, 12), bool_last=True)),
    "mask_3d_inputs": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                       _gen((12, 12, 8), (12, 12, 8), (12, 12, 8), (12, 1, 12))),
    "kv_broadcast": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), _gen((12, 12, 12, 8), (1, 12, 12, 8), (12, 12, 8))),
}


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("case", sorted(SDPA))
def test_sdpa_strategies_are_right_by_brute_force(case: str, tp_size: int) -> None:
    fn, inputs = SDPA[case]
    captured, values = captured_with_values(fn, *inputs)
    (node,) = _ops(_space(captured, tp_size)[0], "aten.scaled_dot_product_attention")
    splits = [s for s in node.strategies if s.divides_output(0)]
    assert splits, f"{case}: the rule offers no split"
    assert _check(captured, values, tp_size) == len(node.strategies)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_sdpa_offers_each_batch_like_dim_and_no_other(tp_size: int) -> None:
    def offered(case: str) -> list[OpStrategy]:
        fn, inputs = SDPA[case]
        captured, _ = captured_with_values(fn, *inputs)
        (node,) = _ops(_space(captured, tp_size)[0], "aten.scaled_dot_product_attention")
        return _single_axis(node)

    three = offered("3d")
    assert OpStrategy((Shard(0),) * 3, Shard(0)) in three
    assert OpStrategy((Shard(1), R, R), Shard(1)) in three  # the query sequence
    assert OpStrategy((Shard(1),) * 3, Shard(1)) not in three  # the old, wrong "heads" split of (N, L, E)
    assert OpStrategy((Shard(1), R, R), Shard(1)) not in offered("3d_causal")
    five = offered("5d")
    assert {s.output for s in five} == {R, Shard(0), Shard(1), Shard(2), Shard(3)}
    assert OpStrategy((Shard(1),) * 3, Shard(1)) in offered("gqa")  # 24 query heads, 12 kv heads
    assert OpStrategy((Shard(1), Shard(1), Shard(1), R), Shard(1)) in offered("mask_broadcast_heads")
    assert OpStrategy((Shard(0), Shard(0), Shard(0), Shard(0)), Shard(0)) in offered("mask_broadcast_heads")
    assert OpStrategy((Shard(2), R, R, Shard(2)), Shard(2)) in offered("mask_broadcast_heads")
    assert OpStrategy((Shard(2), R, R, Shard(0)), Shard(2)) in offered("mask_bool_2d")
    assert OpStrategy((Shard(0), Shard(0), Shard(0), R), Shard(0)) in offered("mask_bool_2d")  # the mask has no batch
    broadcast = offered("kv_broadcast")
    assert OpStrategy((Shard(0), R, R), Shard(0)) in broadcast  # k's size-1 and v's missing batch dim stay whole
    assert OpStrategy((Shard(1), Shard(1), Shard(0)), Shard(1)) in broadcast


# --- multi-output and list outputs --------------------------------------------------------------

@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_multi_output_pointwise_splits_every_output_alike(tp_size: int) -> None:
    captured, values = captured_with_values(lambda x: torch.frexp(x)[0] * torch.frexp(x)[1], torch.randn(12, 24))
    space, unsupported = _space(captured, tp_size)
    assert not unsupported
    (frexp, *_) = _ops(space, "aten.frexp")
    assert OpStrategy((Shard(1),), (Shard(1), Shard(1))) in _single_axis(frexp)
    assert OpStrategy((Shard(0),), (Shard(0), Shard(0))) in _single_axis(frexp)
    _check(captured, values, tp_size)


def test_list_output_falls_back_to_replication() -> None:
    captured, values = captured_with_values(Crashes("histogramdd"), torch.randn(12, 2))
    for tp_size in TP_SIZES:
        space, unsupported = _space(captured, tp_size)
        assert len(unsupported) == 1 and "aten.histogramdd" in unsupported[0], unsupported
        assert f"{__file__}:{_line_of('torch.histogramdd(x, bins')}" in unsupported[0]  # the user's line
        (producer,) = _ops(space, "aten.histogramdd")
        # the items of (hist, [edges]) read the producer as a whole; an item of the list is a plain getitem
        items = [n for n in space.nodes if n.op == "getitem" and not n.slots]
        assert producer.fallback and len(items) == 2 and all(_all_replicated(n) for n in (producer, *items))
        _check(captured, values, tp_size)
    x = torch.randn(12, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        planned = plan_model(Crashes("histogramdd"), (x,), mesh_shape=(2,), hardware="cpu-gloo", memory_budget=None, training=False)
    assert str(next(n for n in planned.plan.nodes if "histogramdd" in n.op).strategy) == "[R] -> R"
    # the rank-local graph looks the items up in the local histogramdd's output (no collective: all R)
    local = rewrite(planned.captured, planned.space, planned.plan, coordinate=(1,), group_names=("tp",))
    for got, want in zip(local(x), Crashes("histogramdd")(x), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_gather_with_an_empty_index_of_another_rank(tp_size: int) -> None:
    captured, values = captured_with_values(lambda x, i: torch.gather(x, -1, i) + 1, torch.tensor(2.0), torch.zeros(0, dtype=torch.long))
    space, unsupported = _space(captured, tp_size)
    assert not unsupported
    (gather,) = _ops(space, "aten.gather")
    assert _all_replicated(gather)
    _check(captured, values, tp_size)


def _raising_rule(ctx: Any) -> Iterator[OpStrategy]:
    yield OpStrategy((Shard(0),), Shard(0))
    raise IndexError("tuple index out of range")


def test_a_rule_that_raises_falls_back_named_in_the_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(RULES, aten.cumsum.default, Rule(_raising_rule))
    captured, _ = captured_with_values(Crashes("raising_rule"), torch.randn(12, 12))
    space, unsupported = _space(captured, 2)
    assert len(unsupported) == 1, unsupported
    text = unsupported[0]
    assert "no sharding rule for aten.renorm" in text  # an op without a rule, in the same warning
    assert re.search(r"could not derive the strategies of aten\.cumsum\.default \(its rule .*_raising_rule raised IndexError: tuple index out of range", text)
    assert f"{__file__}:{_line_of('torch.cumsum(x, 0) +')}" in text
    (cumsum,) = _ops(space, "aten.cumsum")
    assert cumsum.fallback and _all_replicated(cumsum)
    assert space.unsupported_ops == ("aten.cumsum.default", "aten.renorm.default")


# --- shapes that depend on tensor values: a CaptureError at capture ----------------------------

DATA_DEPENDENT = {
    "nonzero": ("aten.nonzero", "torch.nonzero(x > 0)"),
    "argwhere": ("aten.argwhere", "torch.argwhere(x > 0)"),
    "masked_select": ("aten.masked_select", "torch.masked_select(x, x > 0)"),
    "unique": ("aten._unique2", "torch.unique(x.round())"),
    "where": ("aten.where", "torch.where(x > 0)[0]"),
    "tensor_split": ("aten.tensor_split.tensor_indices_or_sections", "torch.tensor_split(x, torch.tensor"),
    "repeat_interleave": ("aten.repeat_interleave.self_Tensor", "torch.repeat_interleave(x, (x[:, 0]"),
    "boolean_index": ("aten.index.Tensor", "x[x > 0].sum()"),
}


@pytest.mark.parametrize("case", sorted(DATA_DEPENDENT))
def test_data_dependent_shape_stops_capture_naming_the_op_and_line(case: str) -> None:
    op, code = DATA_DEPENDENT[case]
    with pytest.raises(autotp.CaptureError) as raised:
        capture(Crashes(case), (torch.randn(12, 24),))
    message = str(raised.value)
    assert f"({op}" in message and f"at {__file__}:{_line_of(code)}: return {code}" in message, message
    assert re.search(r"shape \[[^\]]*u\d+", message) and "depends on the values of its inputs" in message
    assert "torch.where(cond, a, b)" in message  # what to do instead


def data_dependent_model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The CLI target of the test below (``tests.test_op_crashes:data_dependent_model``)."""
    return Crashes("nonzero"), (torch.randn(12, 24),)


def test_plan_and_cli_give_the_same_capture_error(capsys: pytest.CaptureFixture[str]) -> None:
    model, inputs = data_dependent_model()
    with pytest.raises(autotp.CaptureError) as raised:
        autotp.plan(model, inputs, mesh_shape=(2,), training=False)
    assert "node 'nonzero' (aten.nonzero.default)" in str(raised.value)
    assert main(["plan", "tests.test_op_crashes:data_dependent_model", "--mesh", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"autotp: error: {raised.value}"]
