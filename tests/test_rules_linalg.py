"""Batched linear algebra (``autotp/strategies/rules/linalg.py``) checked by brute force.

Every op node of each small model, every strategy the engine offers at 2, 3 and 4 ranks, runs
split per rank and is compared with the unsharded result (``autotp.rewrite.rule_check``). Inputs
are well conditioned (SPD for Cholesky, triangular for triangular solves) so float32 results agree
to the checker's tolerance. The "offers" tests make sure splits are really offered, only on batch
dims, and not on a batch dim an input broadcasts.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

from autotp.capture.export import CapturedGraph, capture
from autotp.ir.placement import P, R, Shard
from autotp.rewrite.rule_check import check_strategy, node_values
from autotp.strategies.engine import NodeKind, NodeSpace, build_strategy_space
from autotp.strategies.rules.registry import OpStrategy
from tests._rule_fns import assert_strategies_hold
from tests.test_rules import Fn

TP_SIZES = (2, 3, 4)
N = 12  # batch and matrix size: every split divides at 2, 3 and 4 ranks

la = torch.linalg


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _spd(*batch: int, n: int = N) -> torch.Tensor:
    x = torch.randn(*batch, n, n, generator=_gen(), dtype=torch.float32)
    return x @ x.mT / n + torch.eye(n)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen())


def _upper(*batch: int, n: int = N) -> torch.Tensor:
    return torch.randn(*batch, n, n, generator=_gen()).triu(1) / n + 2 * torch.eye(n)


def _lu_solve_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    lu, piv = torch.linalg.lu_factor(a)
    return (
        torch.lu_solve(b, lu, piv), la.lu_solve(lu, piv, b), *torch.lu_unpack(lu, piv), *la.lu(a), la.lu_factor_ex(a)[0],
    )


def _qr_parts(a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    qr_a, tau = torch.geqrf(a)
    return (*la.qr(a), qr_a, la.householder_product(qr_a, tau), torch.ormqr(qr_a, tau, c))


def _ldl_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ld, piv = la.ldl_factor(a)
    return ld, la.ldl_solve(ld, piv, b), la.ldl_factor_ex(a)[0]


# name -> (fn(*inputs), inputs)
CASES: dict[str, tuple[Callable[..., Any], Callable[[], tuple[torch.Tensor, ...]]]] = {
    "cholesky": (
        lambda a, b: (la.cholesky(a), torch.cholesky(a), la.cholesky_ex(a)[0], torch.cholesky_inverse(la.cholesky(a)),
                      torch.cholesky_solve(b, la.cholesky(a))),
        lambda: (_spd(N), _rand(N, N, N)),
    ),
    "cholesky_solve_broadcast_rhs": (lambda a, b: torch.cholesky_solve(b, a.tril()), lambda: (_spd(N), _rand(N, N))),
    "inverse_det": (
        lambda a: (la.inv(a), la.inv_ex(a)[0], la.det(a), la.slogdet(a), torch.logdet(a), la.matrix_exp(a / N),
                   la.matrix_power(a, 3), la.pinv(a), la.cond(a), la.matrix_rank(a), la.matrix_norm(a),
                   la.matrix_norm(a, "nuc", dim=(0, 2), keepdim=True)),
        lambda: (_spd(N),),
    ),
    "two_batch_dims": (lambda a: (la.inv(a), la.det(a), la.eigvalsh(a)), lambda: (_spd(N, N, n=3),)),
    "eig_svd": (
        lambda a, s: (la.eigh(s), la.eigvalsh(s), la.eig(a), la.eigvals(a), la.svd(a), la.svdvals(a), torch.svd(a)),
        lambda: (_rand(N, N, N), _spd(N)),
    ),
    "qr": (_qr_parts, lambda: (_rand(N, N, N), _rand(N, N, N))),
    "lu": (_lu_solve_parts, lambda: (_spd(N), _rand(N, N, N))),
    "ldl": (_ldl_parts, lambda: (_spd(N), _rand(N, N, N))),
    "solve": (
        lambda a, b, v, u: (la.solve(a, b), la.solve(a, v), la.solve(a, u), la.solve_ex(a, b)[0], la.solve(a, b, left=False)),
        lambda: (_spd(N), _rand(N, N, N), _rand(N, N), _rand(N)),
    ),
    "triangular": (
        lambda u, b: (la.solve_triangular(u, b, upper=True), la.solve_triangular(u, b, upper=True, left=False),
                      torch.triangular_solve(b, u)),
        lambda: (_upper(N), _rand(N, N, N)),
    ),
    "solve_broadcast_batch": (lambda a, b: la.solve(a, b), lambda: (_spd(N, 1, n=3), _rand(N, N, 3, 3))),
    "cross": (
        lambda a, b, c: (la.cross(a, b, dim=1), la.cross(a, c, dim=1), torch.cross(a.transpose(0, 1), b.transpose(0, 1))),
        lambda: (_rand(N, 3, N), _rand(N, 3, N), _rand(1, 3, N)),
    ),
    "cross_default_dim": (lambda a, b: torch.cross(a, b), lambda: (_rand(N, 3), _rand(N, 3))),
}


@functools.cache
def _case(name: str) -> tuple[CapturedGraph, dict[str, Any]]:
    fn, make_inputs = CASES[name]
    model = Fn(lambda m, *xs: fn(*xs)).eval()
    inputs = make_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, inputs)
        return captured, node_values(captured, model, tuple(t.clone() for t in inputs))


def _spaces(name: str, tp_size: int, op: str) -> list[NodeSpace]:
    captured, _ = _case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = build_strategy_space(captured, tp_size)
    found = [
        replace(n, strategies=tuple(s.axis(0) for s in n.strategies))
        for n in space.nodes if n.kind is NodeKind.OP and n.op.startswith(f"aten.{op}.")
    ]
    assert found, f"{name} has no aten.{op} node"
    return found


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_linalg_strategies_reproduce_unsharded(name: str, tp_size: int) -> None:
    captured, values = _case(name)
    assert assert_strategies_hold(captured, values, tp_size=tp_size) > 0


_BATCH_ONLY = {
    "cholesky": ("linalg_cholesky", "cholesky", "linalg_cholesky_ex", "cholesky_inverse", "cholesky_solve"),
    "inverse_det": ("linalg_inv", "linalg_inv_ex", "linalg_det", "linalg_slogdet", "logdet", "linalg_matrix_exp",
                    "linalg_matrix_power", "linalg_pinv", "linalg_cond", "linalg_matrix_rank"),
    "eig_svd": ("linalg_eigh", "linalg_eigvalsh", "linalg_eig", "linalg_eigvals", "linalg_svd", "linalg_svdvals", "svd"),
    "qr": ("linalg_qr", "geqrf", "linalg_householder_product", "ormqr"),
    "lu": ("linalg_lu_factor", "lu_solve", "linalg_lu_solve", "lu_unpack", "linalg_lu", "linalg_lu_factor_ex"),
    "ldl": ("linalg_ldl_factor", "linalg_ldl_solve", "linalg_ldl_factor_ex"),
    "solve": ("linalg_solve", "linalg_solve_ex"),
    "triangular": ("linalg_solve_triangular", "triangular_solve"),
}


def _split_dims(strategy: OpStrategy) -> set[int]:
    return {p.dim for p in (*strategy.inputs, *strategy.outputs()) if isinstance(p, Shard)}


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_linalg_offers_batch_dim_only(tp_size: int) -> None:
    """Every op splits its one batch dim (dim 0 of every tensor), never a matrix dim but the
    columns of a solve's right-hand side, with the coefficients whole."""
    for name, ops in _BATCH_ONLY.items():
        for op in ops:
            for space in _spaces(name, tp_size, op):
                splits = [s for s in space.strategies if _split_dims(s) and not _rhs_columns(space, s)]
                assert splits, f"{op} in {name} offers no split"
                assert all(_split_dims(s) == {0} for s in splits), f"{op} in {name}: {splits}"
    (two,) = _spaces("two_batch_dims", tp_size, "linalg_inv")
    assert {frozenset(_split_dims(s)) for s in two.strategies} == {frozenset(), frozenset({0}), frozenset({1})}


def _rhs_columns(space: NodeSpace, strategy: OpStrategy) -> bool:
    """One input split on a matrix dim, the others whole: a right-hand side's columns (its rows
    with ``left=False``)."""
    split = [(m, p) for m, p in zip(space.slot_metas, strategy.inputs) if p != R]
    return len(split) == 1 and split[0][1] in (Shard(split[0][0].ndim - 1), Shard(split[0][0].ndim - 2))


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_solves_split_the_columns_of_a_matrix_right_hand_side(tp_size: int) -> None:
    (chol,) = _spaces("cholesky", tp_size, "cholesky_solve")
    assert OpStrategy((Shard(2), R), Shard(2)) in chol.strategies
    (tri,) = _spaces("triangular", tp_size, "triangular_solve")
    assert any(_rhs_columns(tri, s) and s.output == (Shard(2), R) for s in tri.strategies)
    (inv,) = _spaces("inverse_det", tp_size, "linalg_inv")
    assert not any(_rhs_columns(inv, s) for s in inv.strategies)  # an inverse has no right-hand side


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_solves_carry_a_partial_right_hand_side(tp_size: int) -> None:
    (chol,) = _spaces("cholesky", tp_size, "cholesky_solve")
    assert OpStrategy((P, R), P) in chol.strategies
    (tri,) = _spaces("triangular", tp_size, "triangular_solve")
    assert OpStrategy((P, R), (P, R)) in tri.strategies
    for space in _spaces("solve", tp_size, "linalg_solve"):
        assert OpStrategy((R, P), P) in space.strategies
    (inv,) = _spaces("inverse_det", tp_size, "linalg_inv")
    assert not any(p == P for s in inv.strategies for p in (*s.inputs, *s.outputs()))  # inv is not linear


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_broadcast_batch_dims_stay_replicated(tp_size: int) -> None:
    (solve,) = _spaces("solve_broadcast_batch", tp_size, "linalg_solve")  # A (12, 1, 3, 3), B (12, 12, 3, 3)
    assert OpStrategy((Shard(0), Shard(0)), Shard(0)) in solve.strategies
    assert OpStrategy((R, Shard(1)), Shard(1)) in solve.strategies
    assert not any(s.inputs[0] == Shard(1) for s in solve.strategies)
    (chol,) = _spaces("cholesky_solve_broadcast_rhs", tp_size, "cholesky_solve")  # B (12, 12) has no batch dim
    assert OpStrategy((R, Shard(0)), Shard(0)) in chol.strategies
    assert {s.inputs[0] for s in chol.strategies} <= {R, P, Shard(1)}  # B's rows never split; Shard(1): its columns


def test_solve_with_an_ambiguous_right_hand_side_offers_no_split() -> None:
    """``solve(A (12,6,6), B (6,6))``: B is one matrix, broadcast; split A at 2 ranks and B equals
    A's local ``shape[:-1]``, which torch reads as a batch of vectors. The rule offers nothing,
    and the checker shows the naive split is wrong."""
    model = Fn(lambda m, a, b: la.solve(a, b)).eval()
    inputs = (_spd(N, n=6), _rand(6, 6))
    captured = capture(model, inputs)
    values = node_values(captured, model, inputs)
    space = build_strategy_space(captured, 2)
    (node_space,) = [n for n in space.nodes if n.kind is NodeKind.OP and n.op.startswith("aten.linalg_solve")]
    assert all(not _split_dims(s.axis(0)) and P not in s.axis(0).inputs for s in node_space.strategies)
    node = next(n for n in captured.graph_module.graph.nodes if n.name == node_space.name)
    naive = OpStrategy((Shard(0), R), Shard(0))
    assert check_strategy(node, node_space, naive, values, tp_size=2, generator=_gen()) is not None


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_cross_never_splits_its_product_dim(tp_size: int) -> None:
    for space in _spaces("cross", tp_size, "linalg_cross"):
        assert {frozenset(_split_dims(s)) for s in space.strategies} == {frozenset(), frozenset({0}), frozenset({2})}
    # cross without dim takes the first dim of size 3: a split of dim 0 that leaves 3 rows per rank
    # would move it, so at 4 ranks (12 -> 3) dim 0 is not offered
    (default,) = _spaces("cross_default_dim", tp_size, "cross")
    assert any(_split_dims(s) == {0} for s in default.strategies) == (N // tp_size != 3)
