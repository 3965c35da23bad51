"""Attention whose head counts the ranks do not divide: correct results, never a crash.

A split is offered only where ``tp_size`` divides the dim (docs/concepts.md), so a head count
the ranks do not divide is never split: no view offers ``(B, T, H*hd) -> (B, T, H, hd)`` with
the heads split, and attention has no head-split strategy when the query heads do not divide.
Every other split (the projections' output features, the MLP) is still offered. Checked on the
strategy space of the built-in llama, then end to end on real gloo ranks under a budget tight
enough to force the attention weights to be split across head boundaries.

    4 query / 2 KV heads on 4 ranks   grouped-query: KV heads indivisible, query heads divide
    6 / 6 heads (dim 96) on 4 ranks   no head count divides
    12 / 4 heads (dim 96) on 8 ranks  neither divides (8 ranks, about 45 s on two cores)
"""
from __future__ import annotations

import warnings

import pytest

from autotp.capture.export import capture
from autotp.examples import build_example
from autotp.ir.placement import P, R, Shard
from autotp.ir.strategy import OpStrategy, one_axis
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace, build_strategy_space
from autotp.testing import run_on_ranks
from tests import _uneven_heads_fns

# name -> (llama config, world size)
CONFIGS: dict[str, tuple[dict[str, int], int]] = {
    "gqa-4q-2kv-on-4": ({"n_heads": 4, "n_kv_heads": 2}, 4),
    "6-heads-on-4": ({"n_heads": 6, "n_kv_heads": 6, "dim": 96}, 4),
    "12q-4kv-on-8": ({"n_heads": 12, "n_kv_heads": 4, "dim": 96}, 8),
    "control-4q-2kv-on-2": ({"n_heads": 4, "n_kv_heads": 2}, 2),  # everything divides
}
TIGHT = 0.01  # budget 1.01x the smallest that fits: every weight must be split


def _space(config: dict[str, int], tp_size: int) -> StrategySpace:
    model, inputs = build_example("llama", device="meta", **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_strategy_space(capture(model, inputs), tp_size)


def _ops(space: StrategySpace, module: str, op: str) -> list[NodeSpace]:
    return [n for n in space.nodes if n.kind is NodeKind.OP and n.module_path == module and n.op.startswith(op)]


def _head_views(space: StrategySpace) -> list[NodeSpace]:
    """The q, k, v views (B, T, H*hd) -> (B, T, H, hd) of the first block, in that order."""
    views = [n for n in _ops(space, "layers.0.attention", "aten.view") if n.output_meta.ndim == 4]
    assert len(views) == 3, [n.name for n in views]
    return views


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_head_split_offered_only_where_it_divides(name: str) -> None:
    config, tp_size = CONFIGS[name]
    space = _space(config, tp_size)
    n_heads, n_kv_heads = config["n_heads"], config["n_kv_heads"]
    head_split = one_axis(OpStrategy((Shard(2),), Shard(2)))  # (B, T, H*hd) S(2) -> (B, T, H, hd) S(2)
    q, k, v = _head_views(space)
    assert (q.output_meta.shape[2], k.output_meta.shape[2], v.output_meta.shape[2]) == (n_heads, n_kv_heads, n_kv_heads)
    assert (head_split in q.strategies) == (n_heads % tp_size == 0), q.strategies
    assert (head_split in k.strategies) == (n_kv_heads % tp_size == 0), k.strategies
    assert (head_split in v.strategies) == (n_kv_heads % tp_size == 0), v.strategies
    (attention,) = _ops(space, "layers.0.attention", "aten.scaled_dot_product_attention")
    assert (one_axis(OpStrategy((Shard(1),) * 3, Shard(1))) in attention.strategies) == (n_heads % tp_size == 0)
    assert (one_axis(OpStrategy((Shard(0),) * 3, Shard(0))) in attention.strategies) == (2 % tp_size == 0)  # batch 2
    # the other splits are still offered: column- and row-parallel projections and MLP
    (wq,) = _ops(space, "layers.0.attention.wq", "aten.linear")
    assert one_axis(OpStrategy((R, Shard(0)), Shard(2))) in wq.strategies  # its output features divide
    (wo,) = _ops(space, "layers.0.attention.wo", "aten.linear")
    assert one_axis(OpStrategy((Shard(2), Shard(1)), P)) in wo.strategies
    (w1,) = _ops(space, "layers.0.feed_forward.w1", "aten.linear")
    (w2,) = _ops(space, "layers.0.feed_forward.w2", "aten.linear")
    assert one_axis(OpStrategy((R, Shard(0)), Shard(2))) in w1.strategies
    assert one_axis(OpStrategy((Shard(2), Shard(1)), P)) in w2.strategies


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_strategy_splits_an_indivisible_dim(name: str) -> None:
    config, tp_size = CONFIGS[name]
    for node in _space(config, tp_size).nodes:
        metas = (*node.slot_metas, *(node.output_meta if isinstance(node.output_meta, tuple) else (node.output_meta,)))
        for strategy in (s.axis(0) for s in node.strategies):
            for placement, meta in zip((*strategy.inputs, *strategy.outputs()), metas):
                if isinstance(placement, Shard):
                    assert meta.shape[placement.dim] % tp_size == 0, (node.name, str(strategy))


def _check_reports(reports: list[dict], names: list[str]) -> None:
    for rank, report in enumerate(reports):
        for name in names:
            r = report[name]
            assert r["max_abs_diff"] <= 1e-4, (rank, name, r["max_abs_diff"])
            assert r["local_params"] < r["full_params"] and r["collectives"], (rank, name)
            assert not r["state_key_difference"], (rank, name, r["state_key_difference"])
    for name in names:
        config, tp_size = CONFIGS[name]
        r = reports[0][name]
        assert len({tuple(rep[name]["collectives"]) for rep in reports}) == 1, name
        # the tight budget forces the attention weights to be split, heads dividing or not
        attention_weights = [n for n in r["placements"] if ".attention.w" in n]
        assert attention_weights and all(r["placements"][n] != "R" for n in attention_weights), r["placements"]
        if config["n_heads"] % tp_size:  # attention itself cannot split its heads: it runs whole
            assert r["attention"] and all(s == "[R, R, R] -> R" for s in r["attention"]), r["attention"]


@pytest.mark.timeout(420)
def test_uneven_heads_on_4_ranks_equal_original() -> None:
    names = ["gqa-4q-2kv-on-4", "6-heads-on-4"]
    configs = {name: CONFIGS[name][0] for name in names}
    reports = run_on_ranks(_uneven_heads_fns.llama_equivalence, 4, configs, TIGHT, timeout_seconds=360)
    _check_reports(reports, names)


@pytest.mark.timeout(420)
def test_12_heads_on_8_ranks_equal_original() -> None:
    names = ["12q-4kv-on-8"]
    configs = {name: CONFIGS[name][0] for name in names}
    reports = run_on_ranks(_uneven_heads_fns.llama_equivalence, 8, configs, TIGHT, timeout_seconds=360)
    _check_reports(reports, names)
