"""Rules that close DTensor's op coverage: softmax variants and their backward, the ``_copy`` views,
dot/vdot, view_as_complex/real, random draws and new_empty_strided, checked by brute force on 2, 3
and 4 ranks (``autotp.rewrite.rule_check``; random draws compare shapes and dtypes only), the splits
they must offer and must not, and one 2-rank run that parallelizes random ops end to end.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from typing import Any

import pytest
import torch

from autotp.capture.export import CapturedGraph
from autotp.ir.placement import P, R, Shard
from autotp.strategies.engine import NodeKind, NodeSpace, build_strategy_space
from autotp.strategies.rules.registry import OpStrategy
from autotp.testing import run_on_ranks
from tests._coverage_fns import random_ops_model
from tests._rule_fns import DrawnCase, assert_strategies_hold, captured_with_values, ops_without_a_split_rule, randn_inputs
from tests.test_rules import Fn

TP_SIZES = (2, 3, 4)
X = (12, 24, 12)
aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax_backward(m: Any, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y, logy = x.softmax(1), x.log_softmax(-1)
    return (aten._softmax_backward_data(g, y, 1, torch.float32), aten._log_softmax_backward_data(g, logy, -1, torch.float32))


def _copies(m: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (
        aten.view_copy(x, [12, 24, 6, 2]), aten.view_copy(x, [288, 12]), aten.permute_copy(x, [2, 0, 1]),
        aten.transpose_copy(x, 0, 2), aten.t_copy(x[0]), aten.unsqueeze_copy(x, 1), aten.slice_copy(x, 1, 0, 12),
        aten.slice_copy(x, 2, 0, 12), aten.select_copy(x, 1, 3), aten.alias_copy(x) * 2,
        aten.diagonal_copy(x[:, :12, :], 0, 1, 2),
    )


def _more_copies(m: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (
        aten.expand_copy(y, [12, 24, 12]), aten.squeeze_copy(y, 1), aten.squeeze_copy(y),
        *aten.split_with_sizes_copy(x, [8, 16], 1), *aten.split_copy(x, 4, -1), aten.unbind_copy(x, 1)[5],
    )


def _complex(m: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    z = torch.view_as_complex(x)  # (12, 24, 6, 2) -> (12, 24, 6) complex
    return torch.view_as_real(z * z), torch.view_as_real(z).sum(-1)


def _random(m: Any, x: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    p = x.sigmoid()
    return (
        torch.randn_like(x), torch.rand_like(x), torch.randint_like(x, 10), torch.randint_like(x, 3, 10),
        torch.bernoulli(p), torch.bernoulli(x, 0.3), torch.normal(x, 2.0), torch.normal(1.0, p),
        torch.normal(x, p[0]), torch.multinomial(probs, 4), torch.multinomial(probs, 24, replacement=True),
    )


CASES: dict[str, DrawnCase] = {
    "safe_softmax": DrawnCase(lambda m, x: (aten._safe_softmax(x, -1), aten._safe_softmax(x, 1)), randn_inputs(X)),
    "softmax_backward": DrawnCase(_softmax_backward, randn_inputs(X, X)),
    "copies": DrawnCase(_copies, randn_inputs(X)),
    "more_copies": DrawnCase(_more_copies, randn_inputs(X, (12, 1, 12))),
    "bitcast": DrawnCase(
        lambda m, x: (x.view(torch.int32) + 1, x.view(torch.bfloat16).isnan(), aten.view_copy.dtype(x, torch.int16)), randn_inputs(X)
    ),
    "dot": DrawnCase(lambda m, a, b: (torch.dot(a, b), torch.vdot(a, b)), randn_inputs((24,), (24,))),
    "complex": DrawnCase(_complex, randn_inputs((12, 24, 6, 2))),
    "random": DrawnCase(_random, lambda g: (torch.randn(X, generator=g), torch.rand(12, 24, generator=g))),
    "new_empty_strided": DrawnCase(lambda m, x: (x.new_empty_strided((12, 24), (24, 1)), x.new_empty_strided((12, 24), (1, 12))), randn_inputs((12, 24))),
}


@functools.cache
def _case(name: str) -> tuple[CapturedGraph, dict[str, Any]]:
    case = CASES[name]
    return captured_with_values(Fn(case.fn), *case.make(torch.Generator().manual_seed(0)))


def _op_spaces(case: str, tp_size: int, op: str) -> list[NodeSpace]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = build_strategy_space(_case(case)[0], tp_size)
    found = [replace(n, strategies=tuple(s.axis(0) for s in n.strategies)) for n in space.nodes if n.kind is NodeKind.OP and n.op.startswith(op)]
    assert found, f"{case} has no {op} node"
    return found


def _split_dims(space: NodeSpace, slot: int = 0) -> set[int]:
    return {p.dim for s in space.strategies for p in (s.inputs[slot],) if isinstance(p, Shard)}


# --- the brute-force sweep ------------------------------------------------------------------------

@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_of_op(case: str, tp_size: int) -> None:
    captured, values = _case(case)
    assert assert_strategies_hold(captured, values, tp_size=tp_size) > 0


def test_every_op_has_a_rule() -> None:
    for name in CASES:
        assert not ops_without_a_split_rule(_case(name)[0]), name


# --- the splits offered, and those that must not be --------------------------------------------------

@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_softmax_variants_keep_the_softmax_dim_whole(tp_size: int) -> None:
    last, middle = _op_spaces("safe_softmax", tp_size, "aten._safe_softmax")
    assert _split_dims(last) == {0, 1} and _split_dims(middle) == {0, 2}
    backward, log_backward = _op_spaces("softmax_backward", tp_size, "aten._")[-2:]
    assert backward.op.startswith("aten._softmax_backward_data") and log_backward.op.startswith("aten._log_softmax_backward_data")
    assert OpStrategy((Shard(0), Shard(0)), Shard(0)) in backward.strategies
    assert _split_dims(backward, 0) == _split_dims(backward, 1) == {0, 2}
    assert _split_dims(log_backward, 0) == {0, 1}
    assert not any(P in s.inputs for s in (*backward.strategies, *log_backward.strategies))


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_copies_split_like_their_views(tp_size: int) -> None:
    heads, flat = _op_spaces("copies", tp_size, "aten.view_copy")
    assert (OpStrategy((Shard(2),), Shard(2)) in heads.strategies) == (6 % tp_size == 0)  # 12 channels -> 6 pairs of 2
    assert OpStrategy((Shard(0),), Shard(0)) in flat.strategies and Shard(1) not in {s.inputs[0] for s in flat.strategies}
    (permute,) = _op_spaces("copies", tp_size, "aten.permute_copy")
    assert OpStrategy((Shard(2),), Shard(0)) in permute.strategies and OpStrategy((P,), P) in permute.strategies
    slice_all, slice_half = _op_spaces("copies", tp_size, "aten.slice_copy")
    assert _split_dims(slice_all) == {0, 2} and _split_dims(slice_half) == {0, 1, 2}
    (select,) = _op_spaces("copies", tp_size, "aten.select_copy")
    assert OpStrategy((Shard(2),), Shard(1)) in select.strategies
    (expand,) = _op_spaces("more_copies", tp_size, "aten.expand_copy")
    assert OpStrategy((R,), Shard(1)) in expand.strategies  # the expanded dim, on the output alone
    pieces = _op_spaces("more_copies", tp_size, "aten.split_with_sizes_copy")[0]
    assert _split_dims(pieces) == {0, 2}
    (unbind,) = _op_spaces("more_copies", tp_size, "aten.unbind_copy")
    assert OpStrategy((Shard(2),), (Shard(1),) * 24) in unbind.strategies
    assert all(not n.is_view for n in _op_spaces("copies", tp_size, "aten.") if n.op.split(".")[1].endswith("_copy"))


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_bitcasts_pass_no_partial_and_keep_a_resized_last_dim_whole(tp_size: int) -> None:
    same, narrower = _op_spaces("bitcast", tp_size, "aten.view.dtype")
    (copy,) = _op_spaces("bitcast", tp_size, "aten.view_copy.dtype")
    assert _split_dims(same) == {0, 1, 2} and _split_dims(narrower) == _split_dims(copy) == {0, 1}
    assert not any(P in s.inputs for s in (*same.strategies, *narrower.strategies, *copy.strategies))


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_dot_contracts_into_a_partial_sum(tp_size: int) -> None:
    for op in ("aten.dot", "aten.vdot"):
        (space,) = _op_spaces("dot", tp_size, op)
        assert set(space.strategies) >= {OpStrategy((Shard(0), Shard(0)), P), OpStrategy((P, R), P), OpStrategy((R, P), P)}
        assert OpStrategy((P, P), P) not in space.strategies


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_complex_views_keep_the_pair_dim_whole(tp_size: int) -> None:
    (to_complex,) = _op_spaces("complex", tp_size, "aten.view_as_complex")
    assert _split_dims(to_complex) == {0, 1} | ({2} if 6 % tp_size == 0 else set())
    assert 3 not in {s.output.dim for s in to_complex.strategies if isinstance(s.output, Shard)}
    first, _ = _op_spaces("complex", tp_size, "aten.view_as_real")
    assert 3 not in {s.output.dim for s in first.strategies if isinstance(s.output, Shard)}
    assert OpStrategy((Shard(1),), Shard(1)) in first.strategies


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_random_draws_split_like_their_input(tp_size: int) -> None:
    for op in ("aten.randn_like", "aten.rand_like", "aten.randint_like", "aten.bernoulli", "aten.normal"):
        for space in _op_spaces("random", tp_size, op):
            assert OpStrategy((Shard(1),) * len(space.slot_metas), Shard(1)) in space.strategies or space.op.endswith("Tensor_Tensor")
            assert not any(P in (*s.inputs, s.output) for s in space.strategies)  # a draw is not linear
    few, many = _op_spaces("random", tp_size, "aten.multinomial")
    assert _split_dims(few) == _split_dims(many) == {0}  # the category dim stays whole
    (normal_tt,) = _op_spaces("random", tp_size, "aten.normal.Tensor_Tensor")
    # mean (12, 24, 12), std (24, 12): std broadcasts over dim 0
    assert {OpStrategy((Shard(0), R), Shard(0)), OpStrategy((Shard(1), Shard(0)), Shard(1))} <= set(normal_tt.strategies)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_new_empty_strided_splits_like_a_constructor(tp_size: int) -> None:
    contiguous, transposed = _op_spaces("new_empty_strided", tp_size, "aten.new_empty_strided")
    assert {s.output for s in contiguous.strategies} >= {Shard(0), Shard(1)}
    assert {s.output for s in transposed.strategies} == {R}  # a layout whose strides would need re-deriving


# --- end to end -----------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_random_ops_run_split_on_two_ranks() -> None:
    for rank, result in enumerate(run_on_ranks(random_ops_model, 2, timeout_seconds=100)):
        assert result["max_abs_diff"] < 1e-5, (rank, result)
        assert result["shape_ok"], (rank, result)
        # the draws really ran on split tensors, each from this rank's own stream
        draws = {"aten.randn_like.default", "aten.bernoulli.p", "aten.multinomial.default"}
        assert draws <= set(result["split_ops"]), result
        assert draws <= set(result["forked"]), result
