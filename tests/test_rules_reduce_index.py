"""Rules of reductions (value+index, non-linear, nansum), scans, flips/rolls/diagonals, the
scatter/index-write family and bucketize/searchsorted, checked by brute force on 2, 3 and 4 ranks
and on (2, 2) and (2, 3) meshes (``autotp.rewrite.rule_check``), and the splits they offer and
must not offer.

In-place writes (``scatter_``, ``copy_``...) are pinned replicated in a graph
(``autotp.strategies.mutation``), so their rules' strategies are checked one node at a time on
fresh copies of the values (an in-place op run twice on one tensor would see its own write).
One end-to-end run on 2 ranks checks that the planner picks these splits and the rewritten graph
computes the unsharded output.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import fx

from autotp.capture.export import CapturedGraph, capture
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import P, Partial, R, Replicate, Shard
from autotp.rewrite.rule_check import check_strategy, node_values
from autotp.strategies.engine import NodeKind, NodeSpace, _call_space, build_strategy_space
from autotp.strategies.rules.registry import OpStrategy, lookup
from autotp.testing import run_on_ranks
from tests._reduce_index_fns import reduce_scatter_model
from tests._rule_fns import DrawnCase, assert_strategies_hold, ops_without_a_split_rule, randn_inputs
from tests.test_rules import Fn

TP_SIZES = (2, 3, 4)
X = (12, 12, 24)
aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("one_thread")


def _perm(g: torch.Generator, shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """Distinct indices along ``dim`` (a write with repeated indices keeps an arbitrary one)."""
    return torch.rand(shape, generator=g).argsort(dim=dim)


def _scatter_inputs(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    perm = _perm(g, X, 1)
    # x, src, a permutation along dim 1, half of it on half of dim 2, repeated indices
    return torch.randn(X, generator=g), torch.randn(X, generator=g), perm, perm[:, :6, :12].contiguous(), torch.randint(12, X, generator=g)


def _index_inputs(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    # x, source for 6 slices along dim 1, 6 distinct indices < 12, 12 repeated ones, source for them
    k = torch.randperm(12, generator=g)[:6]
    return (torch.randn(X, generator=g), torch.randn(12, 6, 24, generator=g), k, torch.randint(12, (12,), generator=g),
            torch.randn(12, 12, 24, generator=g))


def _search_inputs(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    unsorted = torch.randn(12, generator=g)
    return (torch.randn(X, generator=g), torch.randn(12, generator=g).sort().values, torch.randn(12, 12, 12, generator=g).sort(-1).values,
            unsorted, unsorted.argsort())


CASES: dict[str, DrawnCase] = {
    "value_index": DrawnCase(
        lambda m, x: (x.max(1), x.min(-1, keepdim=True), torch.max(x, 0), x.kthvalue(3, 1), x.kthvalue(2), x.median(1, keepdim=True),
                      x.nanmedian(-1), x.max(), x.min(), x.median(), x.nanmedian()),
        randn_inputs(X),
    ),
    "mode": DrawnCase(lambda m, ids: (ids.mode(1), ids.mode(), ids.mode(-2, keepdim=True)), lambda g: (torch.randint(4, X, generator=g),)),
    "scans_more": DrawnCase(lambda m, x: (x.cummax(1), x.cummin(-1), x.logcumsumexp(1), x.logcumsumexp(-1)), randn_inputs(X)),
    "prod_any_all": DrawnCase(
        lambda m, x: ((x * 0.1 + 1).prod(), (x * 0.1 + 1).prod(1), (x * 0.1 + 1).prod(-1, keepdim=True), (x > 0).any(), (x > 0).any(1),
                      (x > 1).any((0, 2)), (x > 0).any(-1, keepdim=True), (x > -2).all(), (x > -2).all(1), (x > -2).all((1, 2))),
        randn_inputs(X),
    ),
    "norms": DrawnCase(
        lambda m, x: (torch.linalg.vector_norm(x, dim=1), x.norm(), x.norm(dim=-1, keepdim=True), torch.linalg.vector_norm(x, 1, dim=(0, 2)),
                      torch.linalg.vector_norm(x, float("inf"), dim=1), aten.norm.ScalarOpt_dim(x, 2, [1]), aten.norm.Scalar(x, 3),
                      aten.norm.ScalarOpt_dim(x, 1, [-1], True)),
        randn_inputs(X),
    ),
    "nansum": DrawnCase(
        lambda m, x: (lambda y: (y.nansum(1), y.nansum(), y.nansum(-1, keepdim=True), y.nansum((0, 2))))(torch.where(x > 1, float("nan"), x)),
        randn_inputs(X),
    ),
    "var_mean": DrawnCase(
        lambda m, x: (torch.var_mean(x, 1), torch.std_mean(x, -1, keepdim=True), torch.var_mean(x), torch.var_mean(x, (0, 2), correction=0)),
        randn_inputs(X),
    ),
    "flip_roll": DrawnCase(lambda m, x: (x.flip(1), x.flip(0, -1), x.roll(2, 1), x.roll((1, 2), (0, -1)), x.roll(3)), randn_inputs(X)),
    "diagonals": DrawnCase(
        lambda m, x: (x.diagonal(), x.diagonal(1, 1, 2), x.diagonal(-1, -1, 0), torch.diagonal_copy(x, 0, 0, 2), torch.diag(x[0]),
                      torch.diag(x[0, 0], 1), torch.diag_embed(x), torch.diag_embed(x, 0, 0, 2)),
        randn_inputs(X),
    ),
    "scatter": DrawnCase(
        lambda m, x, src, perm, small, rep: (
            x.scatter(1, perm, src), x.scatter(1, small, src), x.scatter(-2, small, src[:, :6, :12]), x.scatter(1, perm, 2.0),
            x.scatter_add(1, rep, src), x.scatter_add(1, small, src), x.scatter_reduce(1, rep, src, "amax"),
            x.scatter_reduce(1, rep, src, "sum", include_self=False), x.scatter_reduce(-1, rep[..., :12], src, "mean"),
            x.scatter(1, rep, src, reduce="add")),
        _scatter_inputs,
    ),
    "index_family": DrawnCase(
        lambda m, x, src, k, rep, src12: (
            x.index_add(1, k, src), x.index_add(-2, rep, src12, alpha=0.5), x.index_fill(1, k, 1.5), x.index_fill(-1, k, src.sum()),
            x.index_copy(1, k, src), x.index_reduce(1, rep, src12, "prod"), x.index_reduce(1, rep, src12, "amax", include_self=False)),
        _index_inputs,
    ),
    "index_put": DrawnCase(
        lambda m, x, src, k, rep, src12: (
            aten.index_put.default(x, [k], src.transpose(0, 1)), aten.index_put.default(x, [None, k], src),
            aten.index_put.default(x, [None, k], src[0, 0]), aten.index_put.default(x, [None, rep], src12, True),
            aten.index_put.default(x, [k, None, k], src[:, :, 0].t()), aten.index_put.default(x, [None, None, k], src[:, 0, :6])),
        _index_inputs,
    ),
    "view_scatter": DrawnCase(
        lambda m, x, y: (x.select_scatter(y[:, 0], 1, 0), x.select_scatter(y[..., 3], -1, 3), x.slice_scatter(y[:, :6], 1, 0, 6),
                         x.slice_scatter(y[..., 12:], -1, 12), x.diagonal_scatter(y.diagonal(0, 0, 1), 0, 0, 1),
                         x.diagonal_scatter(y.diagonal(2, 1, 2), 2, 1, 2), x.masked_scatter(x > 0, y)),
        randn_inputs(X, X),
    ),
    "search": DrawnCase(
        lambda m, x, bnd, seq, unsorted, sorter: (
            torch.bucketize(x, bnd), torch.bucketize(x, bnd, right=True, out_int32=True), torch.searchsorted(bnd, x),
            torch.searchsorted(seq, x), torch.searchsorted(seq, x[..., :12], side="right"), torch.searchsorted(unsorted, x, sorter=sorter)),
        _search_inputs,
    ),
}


def _inplace(m: Any, x: torch.Tensor, src: torch.Tensor, perm: torch.Tensor, small: torch.Tensor, rep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    outs = [x.clone() for _ in range(11)]
    outs[0].scatter_(1, perm, src)
    outs[1].scatter_add_(1, rep, src)
    outs[2].scatter_(1, small, 0.5)
    outs[3].index_add_(1, perm[0, :, 0], src)
    outs[4][perm[0, :6, 0]] = src[:6]  # index_put_
    outs[5].masked_fill_(src > 0, 1.0)
    outs[6].masked_fill_(src[0] > 0, src.sum())
    outs[7].fill_(2.0)
    outs[8].zero_()
    outs[9].copy_(src)
    outs[10].copy_(src[0, :, :1])
    return tuple(outs)


INPLACE = DrawnCase(_inplace, _scatter_inputs)
INPLACE_OPS = ("aten.scatter_.src", "aten.scatter_add_", "aten.scatter_.value", "aten.index_add_", "aten.index_put_",
               "aten.masked_fill_.Scalar", "aten.masked_fill_.Tensor", "aten.fill_.Scalar", "aten.zero_", "aten.copy_")


def _capture(case: DrawnCase) -> tuple[CapturedGraph, tuple[torch.Tensor, ...], Fn]:
    model = Fn(case.fn).eval()
    inputs = case.make(torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture(model, inputs), inputs, model


@functools.cache
def _case(name: str) -> tuple[CapturedGraph, dict[str, Any]]:
    captured, inputs, model = _capture(CASES[name])
    return captured, node_values(captured, model, inputs)


@functools.cache
def _inplace_case() -> tuple[CapturedGraph, dict[str, Any]]:
    """The graph and each node's value as it was when computed (a later write changes the tensor)."""
    captured, inputs, _ = _capture(INPLACE)
    values: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            values[n.name] = result.clone() if isinstance(result, torch.Tensor) else result
            return result

    with torch.no_grad():
        _Recorder(captured.graph_module).run(*inputs)
    return captured, values


def _spaces(captured: CapturedGraph, tp_size: int, op: str) -> list[NodeSpace]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = build_strategy_space(captured, tp_size)
    found = [replace(n, strategies=tuple(s.axis(0) for s in n.strategies)) for n in space.nodes if n.kind is NodeKind.OP and n.op.startswith(op)]
    assert found, f"no {op} node"
    return found


def _op_spaces(case: str, tp_size: int, op: str) -> list[NodeSpace]:
    return _spaces(_case(case)[0], tp_size, op)


def _rule_space(captured: CapturedGraph, tp_size: int, op: str) -> list[tuple[fx.Node, NodeSpace]]:
    """Nodes of ``op`` with the strategies their rule offers, before the write pins them."""
    nodes = {n.name: n for n in captured.graph_module.graph.nodes}
    out = []
    for pinned in _spaces(captured, tp_size, op):
        node = nodes[pinned.name]
        call = _call_space(node, lookup(node.target), pinned.slot_metas, pinned.output_meta, MeshSpec.of(tp_size))
        out.append((node, replace(pinned, strategies=tuple(s.axis(0) for s in call.strategies))))
    return out


def _splits_input(space: NodeSpace, dim: int) -> bool:
    return any(s.inputs[0] == Shard(dim) for s in space.strategies)


def _has_partial(space: NodeSpace) -> bool:
    return any(isinstance(p, Partial) for s in space.strategies for p in (*s.inputs, *s.outputs()))


# --- the brute-force sweeps -------------------------------------------------------------------------

@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_of_op(case: str, tp_size: int) -> None:
    captured, values = _case(case)
    assert assert_strategies_hold(captured, values, tp_size=tp_size) > 0


@pytest.mark.parametrize("mesh_shape", ((2, 2), (2, 3)), ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_combined_strategy_on_2d_meshes(case: str, mesh_shape: tuple[int, int]) -> None:
    captured, values = _case(case)
    assert assert_strategies_hold(captured, values, mesh_shape=mesh_shape) > 0


def test_every_op_has_a_rule() -> None:
    for name in CASES:
        assert not ops_without_a_split_rule(_case(name)[0]), name


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_every_strategy_of_inplace_writes(tp_size: int) -> None:
    """Each strategy of each write's rule, on fresh copies of the values; the write of the
    all-replicate strategy would be seen by every rank, so that one is left out."""
    captured, values = _inplace_case()
    generator = torch.Generator().manual_seed(0)
    failures, checked = [], 0
    for op in INPLACE_OPS:
        for node, space in _rule_space(captured, tp_size, op):
            assert lookup(node.target) is not None, op
            for strategy in space.strategies:
                if all(isinstance(p, Replicate) for p in (*strategy.inputs, *strategy.outputs())):
                    continue
                fresh = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
                checked += 1
                reason = check_strategy(node, space, strategy, fresh, tp_size=tp_size, generator=generator)
                if reason is not None:
                    failures.append(f"{node.name} ({op}) {strategy}: {reason}")
    assert not failures, "\n".join(failures)
    assert checked >= 2 * len(INPLACE_OPS)


# --- what the rules offer ----------------------------------------------------------------------------

@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_value_index_reductions_split_kept_dims_only(tp_size: int) -> None:
    max1, max0 = _op_spaces("value_index", tp_size, "aten.max.dim")
    (min_keep,) = _op_spaces("value_index", tp_size, "aten.min.dim")
    assert OpStrategy((Shard(0),), (Shard(0), Shard(0))) in max1.strategies
    assert OpStrategy((Shard(2),), (Shard(1), Shard(1))) in max1.strategies
    assert not _splits_input(max1, 1) and not _has_partial(max1)
    assert OpStrategy((Shard(1),), (Shard(1), Shard(1))) in min_keep.strategies and not _splits_input(min_keep, 2)
    assert not _splits_input(max0, 0) and OpStrategy((Shard(1),), (Shard(0), Shard(0))) in max0.strategies
    kth1, kth_last = _op_spaces("value_index", tp_size, "aten.kthvalue")
    assert not _splits_input(kth1, 1) and _splits_input(kth1, 2)
    assert not _splits_input(kth_last, 2) and OpStrategy((Shard(1),), (Shard(1), Shard(1))) in kth_last.strategies
    (median,) = _op_spaces("value_index", tp_size, "aten.median.dim")
    assert OpStrategy((Shard(2),), (Shard(2), Shard(2))) in median.strategies and not _splits_input(median, 1)
    mode1, mode_last, mode_keep = _op_spaces("mode", tp_size, "aten.mode")
    assert _splits_input(mode1, 2) and not _splits_input(mode1, 1)
    assert not _splits_input(mode_last, 2) and not _splits_input(mode_keep, 1)
    for op in ("aten.max.default", "aten.min.default", "aten.median.default", "aten.nanmedian.default"):
        (whole,) = _op_spaces("value_index", tp_size, op)
        assert not whole.fallback and len(whole.strategies) == 1, op  # replicated by the rule, not for want of one
    (cummax,) = _op_spaces("scans_more", tp_size, "aten.cummax")
    assert OpStrategy((Shard(2),), (Shard(2), Shard(2))) in cummax.strategies and not _splits_input(cummax, 1)
    (cummin,) = _op_spaces("scans_more", tp_size, "aten.cummin")
    assert _splits_input(cummin, 0) and not _splits_input(cummin, 2)
    lcse1, lcse_last = _op_spaces("scans_more", tp_size, "aten.logcumsumexp")
    assert not _splits_input(lcse1, 1) and not _splits_input(lcse_last, 2) and not _has_partial(lcse1)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_non_linear_reductions_give_no_partial(tp_size: int) -> None:
    whole, dim1, keep = _op_spaces("prod_any_all", tp_size, "aten.prod")
    assert len(whole.strategies) == 1
    assert OpStrategy((Shard(2),), Shard(1)) in dim1.strategies and not _splits_input(dim1, 1)
    assert OpStrategy((Shard(1),), Shard(1)) in keep.strategies and not _splits_input(keep, 2)
    (any_dims,) = _op_spaces("prod_any_all", tp_size, "aten.any.dims")
    assert [s for s in any_dims.strategies if s.inputs[0] != R] == [OpStrategy((Shard(1),), Shard(0))]
    (all_dims,) = _op_spaces("prod_any_all", tp_size, "aten.all.dims")
    assert [s for s in all_dims.strategies if s.inputs[0] != R] == [OpStrategy((Shard(0),), Shard(0))]
    norms = _op_spaces("norms", tp_size, "aten.linalg_vector_norm")
    assert OpStrategy((Shard(2),), Shard(1)) in norms[0].strategies and not _splits_input(norms[0], 1)
    assert len(norms[1].strategies) == 1  # x.norm(): every dim
    assert OpStrategy((Shard(1),), Shard(1)) in norms[2].strategies and not _splits_input(norms[2], 2)
    scalar_opt = _op_spaces("norms", tp_size, "aten.norm.ScalarOpt_dim")
    assert OpStrategy((Shard(0),), Shard(0)) in scalar_opt[0].strategies and not _splits_input(scalar_opt[0], 1)
    assert OpStrategy((Shard(1),), Shard(1)) in scalar_opt[1].strategies and not _splits_input(scalar_opt[1], 2)
    for case, op in (("prod_any_all", "aten.prod"), ("prod_any_all", "aten.any"), ("prod_any_all", "aten.all"), ("norms", "aten.linalg_vector_norm"),
                     ("norms", "aten.norm"), ("var_mean", "aten.var_mean"), ("var_mean", "aten.std_mean")):
        assert not any(_has_partial(s) for s in _op_spaces(case, tp_size, op)), op
    (var_mean1, *_) = _op_spaces("var_mean", tp_size, "aten.var_mean")
    assert OpStrategy((Shard(2),), (Shard(1), Shard(1))) in var_mean1.strategies and not _splits_input(var_mean1, 1)
    (std_keep,) = _op_spaces("var_mean", tp_size, "aten.std_mean")
    assert OpStrategy((Shard(1),), (Shard(1), Shard(1))) in std_keep.strategies and not _splits_input(std_keep, 2)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_nansum_adds_chunks_but_does_not_pass_partial(tp_size: int) -> None:
    dim1, whole, keep, dims02 = _op_spaces("nansum", tp_size, "aten.nansum")
    assert OpStrategy((Shard(1),), P) in dim1.strategies and OpStrategy((Shard(2),), Shard(1)) in dim1.strategies
    assert all(OpStrategy((Shard(d),), P) in whole.strategies for d in range(3))
    assert OpStrategy((Shard(2),), P) in keep.strategies and OpStrategy((Shard(1),), Shard(1)) in keep.strategies
    assert OpStrategy((Shard(1),), Shard(0)) in dims02.strategies
    assert not any(OpStrategy((P,), P) in s.strategies for s in (dim1, whole, keep, dims02))


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_flips_rolls_and_diagonals_keep_their_dims_whole(tp_size: int) -> None:
    flip1, flip02 = _op_spaces("flip_roll", tp_size, "aten.flip")
    assert OpStrategy((Shard(0),), Shard(0)) in flip1.strategies and OpStrategy((P,), P) in flip1.strategies
    assert not _splits_input(flip1, 1) and not _splits_input(flip02, 0) and not _splits_input(flip02, 2) and _splits_input(flip02, 1)
    roll1, roll_pair, roll_flat = _op_spaces("flip_roll", tp_size, "aten.roll")
    assert _splits_input(roll1, 0) and not _splits_input(roll1, 1)
    assert [s.inputs for s in roll_pair.strategies if s.inputs[0] != R] == [(Shard(1),), (P,)]
    assert [s.inputs for s in roll_flat.strategies if s.inputs[0] != R] == [(P,)]  # a flat roll moves across every dim
    diag01, diag12, diag20 = _op_spaces("diagonals", tp_size, "aten.diagonal.default")
    assert OpStrategy((Shard(2),), Shard(0)) in diag01.strategies and not _splits_input(diag01, 0) and not _splits_input(diag01, 1)
    assert OpStrategy((Shard(0),), Shard(0)) in diag12.strategies and not _splits_input(diag12, 2)
    assert OpStrategy((Shard(1),), Shard(0)) in diag20.strategies and not _splits_input(diag20, 0)
    (copy,) = _op_spaces("diagonals", tp_size, "aten.diagonal_copy")
    assert OpStrategy((Shard(1),), Shard(0)) in copy.strategies
    embed_last, embed02 = _op_spaces("diagonals", tp_size, "aten.diag_embed")
    assert OpStrategy((Shard(1),), Shard(1)) in embed_last.strategies and not _splits_input(embed_last, 2)
    assert OpStrategy((Shard(0),), Shard(1)) in embed02.strategies and OpStrategy((Shard(1),), Shard(3)) in embed02.strategies
    for diag in _op_spaces("diagonals", tp_size, "aten.diag.default"):
        assert [s.inputs for s in diag.strategies if s.inputs[0] != R] == [(P,)]


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_scatters_keep_the_scatter_dim_and_smaller_index_dims_whole(tp_size: int) -> None:
    perm, small, small_neg, value = _op_spaces("scatter", tp_size, "aten.scatter.")[:4]
    assert OpStrategy((Shard(0),) * 3, Shard(0)) in perm.strategies and OpStrategy((Shard(2),) * 3, Shard(2)) in perm.strategies
    assert OpStrategy((P, R, P), P) in perm.strategies and not _splits_input(perm, 1)
    assert OpStrategy((Shard(0),) * 3, Shard(0)) in small.strategies
    assert not _splits_input(small, 2) and not _splits_input(small_neg, 2)  # the index covers half of dim 2
    assert OpStrategy((Shard(2), Shard(2)), Shard(2)) in value.strategies and not _has_partial(value)  # a value is no summand
    add_rep, add_small = _op_spaces("scatter", tp_size, "aten.scatter_add")
    assert OpStrategy((P, R, P), P) in add_rep.strategies and OpStrategy((Shard(2),) * 3, Shard(2)) in add_rep.strategies
    assert not _splits_input(add_small, 2)
    for reduce in _op_spaces("scatter", tp_size, "aten.scatter_reduce"):
        assert not _has_partial(reduce)
    amax, _, mean_last = _op_spaces("scatter", tp_size, "aten.scatter_reduce")
    assert _splits_input(amax, 0) and not _splits_input(amax, 1)
    assert not _splits_input(mean_last, 2) and _splits_input(mean_last, 1)
    add, add_neg = _op_spaces("index_family", tp_size, "aten.index_add")
    assert OpStrategy((Shard(0), R, Shard(0)), Shard(0)) in add.strategies and OpStrategy((Shard(2), R, Shard(2)), Shard(2)) in add.strategies
    assert OpStrategy((P, R, P), P) in add.strategies and not _splits_input(add, 1) and not _splits_input(add_neg, 1)
    fill_scalar, fill_tensor = _op_spaces("index_family", tp_size, "aten.index_fill")
    assert OpStrategy((Shard(2), R), Shard(2)) in fill_scalar.strategies and not _has_partial(fill_scalar)
    assert OpStrategy((Shard(1), R, R), Shard(1)) in fill_tensor.strategies and not _splits_input(fill_tensor, 2)
    (copy,) = _op_spaces("index_family", tp_size, "aten.index_copy")
    assert OpStrategy((P, R, P), P) in copy.strategies
    for reduce in _op_spaces("index_family", tp_size, "aten.index_reduce"):
        assert OpStrategy((Shard(0), R, Shard(0)), Shard(0)) in reduce.strategies and not _has_partial(reduce)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_index_put_splits_unindexed_dims_with_values(tp_size: int) -> None:
    first, middle, broadcast, accumulate, apart, last = _op_spaces("index_put", tp_size, "aten.index_put")
    # x[k] = v(6, 12, 24): dims 1 and 2 unindexed
    assert OpStrategy((Shard(1), R, Shard(1)), Shard(1)) in first.strategies and not _splits_input(first, 0)
    assert OpStrategy((Shard(0), R, Shard(0)), Shard(0)) in middle.strategies and not _splits_input(middle, 1)
    # x[:, k] = v(24,): v broadcasts along dim 0 and meets dim 2
    assert OpStrategy((Shard(0), R, R), Shard(0)) in broadcast.strategies
    assert OpStrategy((Shard(2), R, Shard(0)), Shard(2)) in broadcast.strategies
    assert OpStrategy((P, R, P), P) in accumulate.strategies and OpStrategy((Shard(2), R, Shard(2)), Shard(2)) in accumulate.strategies
    # x[k, :, k] = v(6, 12): the index dims lead, dim 1 of x meets v's dim 1
    assert [s for s in apart.strategies if isinstance(s.output, Shard)] == [OpStrategy((Shard(1), R, R, Shard(1)), Shard(1))]
    # x[:, :, k] = v(12, 6): v's dim 0 meets dim 1 of x; v broadcasts along dim 0
    assert OpStrategy((Shard(1), R, Shard(0)), Shard(1)) in last.strategies and OpStrategy((Shard(0), R, R), Shard(0)) in last.strategies
    assert not _splits_input(last, 2)
    (masked,) = _op_spaces("view_scatter", tp_size, "aten.masked_scatter")
    assert [s for s in masked.strategies if s.inputs[0] != R] == [OpStrategy((P, R, P), P)]


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_view_scatters_and_searches_offer_their_splits(tp_size: int) -> None:
    select1, select_last = _op_spaces("view_scatter", tp_size, "aten.select_scatter")
    assert OpStrategy((Shard(2), Shard(1)), Shard(2)) in select1.strategies and not _splits_input(select1, 1)
    assert OpStrategy((P, P), P) in select1.strategies and not _splits_input(select_last, 2)
    slice1, slice_last = _op_spaces("view_scatter", tp_size, "aten.slice_scatter")
    assert OpStrategy((Shard(0), Shard(0)), Shard(0)) in slice1.strategies and not _splits_input(slice1, 1)
    assert OpStrategy((Shard(1), Shard(1)), Shard(1)) in slice_last.strategies and not _splits_input(slice_last, 2)
    diag01, diag12 = _op_spaces("view_scatter", tp_size, "aten.diagonal_scatter")
    assert OpStrategy((Shard(2), Shard(0)), Shard(2)) in diag01.strategies and not _splits_input(diag01, 0)
    assert OpStrategy((Shard(0), Shard(0)), Shard(0)) in diag12.strategies and not _splits_input(diag12, 1)
    bucket, _ = _op_spaces("search", tp_size, "aten.bucketize")
    assert all(OpStrategy((Shard(d), R), Shard(d)) in bucket.strategies for d in range(3))
    flat, batched, batched_right, with_sorter = _op_spaces("search", tp_size, "aten.searchsorted")
    assert all(OpStrategy((R, Shard(d)), Shard(d)) in flat.strategies for d in range(3))
    assert OpStrategy((Shard(1), Shard(1)), Shard(1)) in batched.strategies
    assert not any(Shard(2) in s.inputs for s in (*batched.strategies, *batched_right.strategies))  # one sequence per line
    assert OpStrategy((R, Shard(2), R), Shard(2)) in with_sorter.strategies


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_inplace_writes_offer_the_out_of_place_splits(tp_size: int) -> None:
    captured, _ = _inplace_case()
    (scatter,), (scatter_add,), (scatter_value,) = (
        [s for _, s in _rule_space(captured, tp_size, op)] for op in ("aten.scatter_.src", "aten.scatter_add_", "aten.scatter_.value"))
    assert OpStrategy((Shard(2),) * 3, Shard(2)) in scatter.strategies and OpStrategy((P, R, P), P) in scatter.strategies
    assert not _splits_input(scatter, 1) and OpStrategy((P, R, P), P) in scatter_add.strategies
    assert OpStrategy((Shard(0), Shard(0)), Shard(0)) in scatter_value.strategies and not _splits_input(scatter_value, 2)
    (index_add,) = (s for _, s in _rule_space(captured, tp_size, "aten.index_add_"))
    assert OpStrategy((Shard(2), R, Shard(2)), Shard(2)) in index_add.strategies and not _splits_input(index_add, 1)
    (index_put,) = (s for _, s in _rule_space(captured, tp_size, "aten.index_put_"))
    assert OpStrategy((Shard(1), R, Shard(1)), Shard(1)) in index_put.strategies and not _splits_input(index_put, 0)
    (fill,) = (s for _, s in _rule_space(captured, tp_size, "aten.fill_"))
    assert all(_splits_input(fill, d) for d in range(3)) and not _has_partial(fill)
    (masked,) = (s for _, s in _rule_space(captured, tp_size, "aten.masked_fill_.Tensor"))
    assert OpStrategy((Shard(1), Shard(0), R), Shard(1)) in masked.strategies and not _has_partial(masked)
    (zero,) = (s for _, s in _rule_space(captured, tp_size, "aten.zero_"))
    assert OpStrategy((P,), P) in zero.strategies
    copy, copy_broadcast = (s for _, s in _rule_space(captured, tp_size, "aten.copy_"))
    assert OpStrategy((P, P), P) in copy.strategies and OpStrategy((Shard(2), Shard(2)), Shard(2)) in copy.strategies
    assert OpStrategy((Shard(2), R), Shard(2)) in copy_broadcast.strategies and OpStrategy((Shard(1), Shard(0)), Shard(1)) in copy_broadcast.strategies
    # in a graph the writes stay replicated (autotp.strategies.mutation)
    assert all(len(s.strategies) == 1 for s in _spaces(captured, tp_size, "aten.scatter_"))


# --- the checker catches the wrong splits these rules leave out ------------------------------------

WRONG: tuple[tuple[str, str, int, OpStrategy], ...] = (
    ("value_index", "aten.max.dim", 0, OpStrategy((Shard(1),), (P, R))),  # chunk maxima do not add up
    ("scans_more", "aten.cummax", 0, OpStrategy((Shard(1),), (Shard(1), Shard(1)))),  # each chunk restarts
    ("prod_any_all", "aten.prod.dim_int", 0, OpStrategy((Shard(1),), P)),  # chunk products do not add up
    ("norms", "aten.linalg_vector_norm", 0, OpStrategy((P,), P)),  # a norm is not linear
    ("nansum", "aten.nansum", 0, OpStrategy((P,), P)),  # a NaN is dropped from one summand only
    ("flip_roll", "aten.flip", 0, OpStrategy((Shard(1),), Shard(1))),  # flips each chunk in place
    ("flip_roll", "aten.roll", 0, OpStrategy((Shard(1),), Shard(1))),  # rolls within each chunk
    ("diagonals", "aten.diagonal.default", 0, OpStrategy((Shard(0),), Shard(1))),  # a chunk's diagonal is off the global one
    ("scatter", "aten.scatter.src", 0, OpStrategy((Shard(1),) * 3, Shard(1))),  # the index addresses the whole dim
    ("scatter", "aten.scatter.value", 0, OpStrategy((P, R), P)),  # every rank writes the value
    ("index_family", "aten.index_add", 0, OpStrategy((Shard(1), R, Shard(1)), Shard(1))),  # the indexed dim
    ("index_put", "aten.index_put", 1, OpStrategy((Shard(1), R, Shard(1)), Shard(1))),  # the indexed dim
    ("search", "aten.searchsorted", 1, OpStrategy((Shard(2), Shard(2)), Shard(2))),  # part of each sequence
)


@pytest.mark.parametrize("case,op,index,strategy", WRONG, ids=[f"{c}-{o}-{s}" for c, o, _, s in WRONG])
def test_checker_rejects_wrong_strategy(case: str, op: str, index: int, strategy: OpStrategy) -> None:
    captured, values = _case(case)
    space = _op_spaces(case, 2, op)[index]
    node = next(n for n in captured.graph_module.graph.nodes if n.name == space.name)
    assert check_strategy(node, space, strategy, values, tp_size=2, generator=torch.Generator().manual_seed(0)) is not None


# --- end to end on real ranks ------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_split_reductions_and_scatters_run_on_two_ranks() -> None:
    """The planner picks these rules' splits and the rewritten graph computes the same output."""
    results = run_on_ranks(reduce_scatter_model, 2, timeout_seconds=200)
    for result in results:
        assert result["max_abs_diff"] < 1e-4, result
    new_ops = {"aten.max.dim", "aten.kthvalue.default", "aten.flip.default", "aten.cummax.default", "aten.logcumsumexp.default",
               "aten.roll.default", "aten.scatter_add.default", "aten.diagonal.default"}
    assert len(new_ops & set(results[0]["split_ops"])) >= 4, results[0]["split_ops"]
