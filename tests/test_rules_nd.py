"""Every combined strategy checked by brute force on 2-D meshes (see ``autotp.rewrite.rule_check``).

The graphs of ``tests/test_rules.py`` (the examples and the op table) on (2, 2) and (2, 3) meshes:
each rank, named by its mesh coordinate, gets its inputs per ``Placements`` (one placement per
axis), runs the op as the rewriter emits it (``local_call``, shape arguments localised axis by
axis) and the outputs are reassembled per the output ``Placements``. This checks the engine's
product of the per-axis rule answers (``combine_axes``) and the axis-by-axis localisation, not
only the rules. (2, 3) mixes an even and an odd axis, so a localisation that divides by the
wrong axis's size fails there. Every strategy is checked (no sampling): the whole file runs in
seconds.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from autotp.capture.export import capture
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import P, Partial, R, Replicate, Shard
from autotp.ir.strategy import MeshStrategy
from autotp.rewrite.rule_check import _compare, _split, check_graph, check_strategy
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace, build_strategy_space
from autotp.strategies.rules.registry import OpStrategy
from tests._rule_fns import assert_strategies_hold
from tests.test_rules import CASES, EXAMPLE_CONFIGS, Fn, _case, _example

MESHES = ((2, 2), (2, 3))


pytestmark = pytest.mark.usefixtures("one_thread")


def _space(case: str, mesh_shape: tuple[int, ...]) -> StrategySpace:
    return build_strategy_space(_case(case)[0], MeshSpec.of(mesh_shape))


def _op_space(case: str, mesh_shape: tuple[int, ...], op: str) -> NodeSpace:
    return next(n for n in _space(case, mesh_shape).nodes if n.kind is NodeKind.OP and n.op.startswith(op))


def _divided_on_every_axis(strategy: MeshStrategy) -> bool:
    """Some tensor of the strategy is split or partial on each mesh axis."""
    return all(any(not isinstance(p[a], Replicate) for p in (*strategy.inputs, *strategy.outputs)) for a in range(strategy.ndim))


# --- the sweeps -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
@pytest.mark.parametrize("config", sorted(EXAMPLE_CONFIGS))
def test_every_combined_strategy_of_every_example_node(config: str, mesh_shape: tuple[int, ...]) -> None:
    captured, values = _example(config)
    checked = assert_strategies_hold(captured, values, mesh_shape=mesh_shape)
    space = build_strategy_space(captured, MeshSpec.of(mesh_shape))
    ops = [n for n in space.nodes if n.kind is NodeKind.OP]
    # every strategy but those of the vocab-parallel embedding (a local implementation on one
    # axis, output P there), which tests/test_vocab_parallel.py checks on real ranks
    local = sum(1 for n in ops if n.op.startswith("aten.embedding") for s in n.strategies if P in s.output)
    assert checked == sum(len(n.strategies) for n in ops) - local
    both = sum(1 for n in ops for s in n.strategies if _divided_on_every_axis(s))
    assert both >= checked // 3, f"only {both} of {checked} strategies divide something on both axes"


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_combined_strategy_of_op(case: str, mesh_shape: tuple[int, ...]) -> None:
    captured, values = _case(case)
    assert_strategies_hold(captured, values, mesh_shape=mesh_shape)


def test_sampling_is_deterministic_and_keeps_all_replicate() -> None:
    captured, values = _example("gpt")
    full, _ = check_graph(captured, values, mesh_shape=(2, 2))
    sampled = [check_graph(captured, values, mesh_shape=(2, 2), max_per_node=4, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0][1] == []
    assert sampled[0][0] < full and sampled[0][0] == sampled[2][0]


# --- the checker's layout of N-D placements ---------------------------------------------------------

@pytest.mark.parametrize("placements", [
    (R, R), (Shard(0), Shard(1)), (Shard(1), Shard(0)), (Shard(1), P), (P, Shard(2)), (P, P), (P, R), (R, Shard(2)),
], ids=str)
def test_split_then_reassemble_is_the_identity(placements: tuple) -> None:
    """``_split`` lays a tensor out as ``placements`` and ``_compare`` accepts that layout as the
    tensor: S(d) on axis a is chunk coordinate[a], P summands add up over their axis."""
    value = torch.randn(6, 6, 12, generator=torch.Generator().manual_seed(0))
    mesh_shape = (2, 3)
    local = _split(value, placements, mesh_shape, torch.Generator().manual_seed(1))
    assert sorted(local) == list(itertools.product(range(2), range(3)))
    assert _compare(value, placements, local, mesh_shape=mesh_shape, exact=True) is None
    if any(isinstance(p, Partial) for p in placements):  # the summands are not the value itself
        assert not torch.allclose(local[(0, 0)], local[(1, 2)])
        assert _compare(value, placements, {c: t * 1.01 for c, t in local.items()}, mesh_shape=mesh_shape, exact=True) is not None


def _mesh(*axes: OpStrategy) -> MeshStrategy:
    return MeshStrategy.from_axes(axes)


RIGHT: tuple[tuple[str, str, MeshStrategy], ...] = (
    # batch on axis 0, column parallel on axis 1
    ("linear_bias_3d", "aten.linear", _mesh(OpStrategy((Shard(0), R, R), Shard(0)), OpStrategy((R, Shard(0), Shard(0)), Shard(2)))),
    # batch on axis 0, row parallel on axis 1: a partial sum of batch chunks
    ("linear_bias_3d", "aten.linear", _mesh(OpStrategy((Shard(0), R, R), Shard(0)), OpStrategy((Shard(2), Shard(1), P), P))),
    # C -> (heads, head_dim): T split on one axis, heads on the other (both localise the view's shape)
    ("heads_view", "aten.view", _mesh(OpStrategy((Shard(1),), Shard(1)), OpStrategy((Shard(2),), Shard(2)))),
    # batch on one axis, heads on the other (dropout_p=0: no random draws)
    ("sdpa_causal", "aten.scaled_dot_product_attention", _mesh(OpStrategy((Shard(0),) * 3, Shard(0)), OpStrategy((Shard(1),) * 3, Shard(1)))),
)

WRONG: tuple[tuple[str, str, MeshStrategy], ...] = (
    # the bias is added once per rank of axis 0
    ("linear_bias_3d", "aten.linear", _mesh(OpStrategy((Shard(2), Shard(1), R), P), OpStrategy((Shard(0), R, R), Shard(0)))),
    # row parallel on axis 1 leaves a partial sum there, not a split
    ("linear_bias_3d", "aten.linear", _mesh(OpStrategy((Shard(0), R, R), Shard(0)), OpStrategy((Shard(2), Shard(1), P), Shard(2)))),
    # T and heads swapped between the axes
    ("heads_view", "aten.view", _mesh(OpStrategy((Shard(1),), Shard(2)), OpStrategy((Shard(2),), Shard(1)))),
    # softmax normalises each chunk of the split dim alone (on axis 1 only)
    ("softmax", "aten.softmax", _mesh(OpStrategy((Shard(0),), Shard(0)), OpStrategy((Shard(2),), Shard(2)))),
    # gelu of a partial sum on axis 1
    ("unary", "aten.gelu", _mesh(OpStrategy((Shard(1),), Shard(1)), OpStrategy((P,), P))),
    # sum over T split on axis 1: partial there, not replicated
    ("reductions", "aten.sum.dim_IntList", _mesh(OpStrategy((Shard(0),), Shard(0)), OpStrategy((Shard(1),), R))),
)


@pytest.mark.parametrize("case,op,strategy", RIGHT, ids=[f"{c}-{s}" for c, _, s in RIGHT])
def test_checker_accepts_right_combination(case: str, op: str, strategy: MeshStrategy) -> None:
    captured, values = _case(case)
    for mesh_shape in MESHES:
        space = _op_space(case, mesh_shape, op)
        assert strategy in space.strategies, (mesh_shape, str(strategy))  # the engine offers it
        node = next(n for n in captured.graph_module.graph.nodes if n.name == space.name)
        assert check_strategy(node, space, strategy, values, mesh_shape=mesh_shape, generator=torch.Generator().manual_seed(0)) is None


@pytest.mark.parametrize("case,op,strategy", WRONG, ids=[f"{c}-{s}" for c, _, s in WRONG])
def test_checker_rejects_wrong_combination(case: str, op: str, strategy: MeshStrategy) -> None:
    captured, values = _case(case)
    space = _op_space(case, (2, 2), op)
    node = next(n for n in captured.graph_module.graph.nodes if n.name == space.name)
    assert check_strategy(node, space, strategy, values, mesh_shape=(2, 2), generator=torch.Generator().manual_seed(0)) is not None


# --- the engine's filter on random ops ------------------------------------------------------------

def test_only_calls_that_draw_random_numbers_split_on_one_axis_at_most() -> None:
    """A random op draws from one axis's per-rank stream, so its output splits over one axis at
    most; attention with ``dropout_p=0`` and eval-mode dropout draw nothing and combine freely.
    (Regression: every op tagged ``nondeterministic_seeded`` was held to one axis, so a 2-D mesh
    could not split attention by batch on one axis and by heads on the other.)"""
    def two_axis_splits(space: NodeSpace) -> list[MeshStrategy]:
        return [s for s in space.strategies if sum(any(isinstance(p, Shard) for p in s.axis(a).outputs()) for a in range(2)) == 2]

    for case, op in (("sdpa", "aten.scaled_dot_product_attention"), ("dropout_eval", "aten.dropout")):
        assert two_axis_splits(_op_space(case, (2, 2), op)), case
    training = capture(Fn(lambda m, x: F.dropout(x, 0.1, training=True) * 2), (torch.randn(4, 12, 24),))
    (dropout,) = (n for n in build_strategy_space(training, MeshSpec.of((2, 2))).nodes if n.op.startswith("aten.dropout"))
    assert not two_axis_splits(dropout)
    assert any(isinstance(s.output[0], Shard) for s in dropout.strategies)  # one axis still splits it
