"""Hugging Face ``transformers`` models (GPT-2, LLaMA, BERT) split on real gloo ranks.

Tiny configs, random weights, nothing downloaded. The models go to ``autotp`` unmodified with
``(input_ids,)`` and come back returning their ``ModelOutput``; ``bert+mask`` is BERT behind a
small wrapper that also passes a padding ``attention_mask`` (``parallelize`` takes positional
tensors only). Each model is checked twice:

- every strategy of every node of its captured graph, by brute force in one process
  (``autotp.rewrite.rule_check``), on 2, 3 and 4 ranks and on (2, 2) and (2, 3) meshes;
- end to end: ``autotp.parallelize`` on 2 and 4 ranks gives the original logits (atol 1e-4), with
  weights really split and collectives in the graph. On 2 ranks the budget is just above the
  smallest that fits, which forces every weight matrix to split, the attention projections
  included; on 4 ranks it is 1.25x an even share and the planner chooses. LLaMA's 2 KV heads do
  not divide by 4 ranks: no strategy splits them there (see tests/test_uneven_heads.py), and the
  model still runs correctly.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install -e '.[test]')")

from autotp.capture.export import CapturedGraph, capture
from autotp.rewrite.rule_check import check_graph, node_values
from autotp.strategies.engine import NodeKind, build_strategy_space
from autotp.testing import run_on_ranks
from tests import _hf_fns

MODELS = list(_hf_fns.MODELS)
BUDGETS = {2: 0.01, 4: 1.25}  # world size -> budget factor (see _hf_fns.hf_equivalence)


@functools.cache
def _captured(name: str) -> tuple[CapturedGraph, dict[str, Any]]:
    model, inputs = _hf_fns.build_hf_model(name)
    captured = capture(model, inputs)
    return captured, node_values(captured, model, inputs)


@pytest.mark.parametrize("tp_size", [2, 3, 4])
@pytest.mark.parametrize("name", MODELS)
def test_every_strategy_of_every_hf_node(name: str, tp_size: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        captured, values = _captured(name)
        checked, failures = check_graph(captured, values, tp_size=tp_size)
    finally:
        torch.set_num_threads(threads)
    assert not failures, "\n".join(str(f) for f in failures)
    space = build_strategy_space(captured, tp_size)
    split = sum(1 for n in space.nodes if n.kind is NodeKind.OP for s in n.strategies if s != n.strategies[0])
    assert split >= checked // (2 if tp_size != 3 else 4), f"only {split} of {checked} strategies split anything"


@pytest.mark.parametrize("mesh_shape", [(2, 2), (2, 3)], ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_every_combined_strategy_of_every_hf_node(name: str, mesh_shape: tuple[int, int]) -> None:
    """Every strategy the engine combines from the rules' per-axis answers (tests/test_rules_nd.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        captured, values = _captured(name)
        checked, failures = check_graph(captured, values, mesh_shape=mesh_shape)
    finally:
        torch.set_num_threads(threads)
    assert not failures, "\n".join(str(f) for f in failures)
    assert checked > 0


@pytest.mark.parametrize("name", MODELS)
def test_every_hf_op_has_a_rule(name: str) -> None:
    captured, _ = _captured(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an UnsupportedOpWarning fails here, naming the ops
        space = build_strategy_space(captured, 4)
    assert not space.unsupported_ops
    assert not any(n.fallback for n in space.nodes if n.kind is NodeKind.OP)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [2, 4])
def test_hf_models_equal_original(world_size: int) -> None:
    factor = BUDGETS[world_size]
    reports = run_on_ranks(_hf_fns.hf_equivalence, world_size, MODELS, [factor], timeout_seconds=540)
    for rank, report in enumerate(reports):
        for key, r in report.items():
            assert r["output_type"] == r["expected_type"], (key, r)  # the ModelOutput is rebuilt
            assert r["max_abs_diff"] <= _hf_fns.ATOL, (rank, key, r["max_abs_diff"])
            assert r["local_params"] < r["full_params"], (rank, key)  # the budget forced splits
            assert any(p != "R" for p in r["placements"].values()), (rank, key)
            assert r["collectives"], (rank, key)
            assert not r["state_key_difference"], (rank, key, r["state_key_difference"])
            assert not r["unsupported"], (key, r["unsupported"])
    for key in reports[0]:  # every rank runs the same collectives in the same order
        assert len({tuple(r[key]["collectives"]) for r in reports}) == 1, key
    if world_size == 2:  # the tight budget leaves no room for a whole matrix: all of them split
        for key, r in reports[0].items():
            big = [n for n, shape in r["shapes"].items() if len(shape) == 2 and shape[0] * shape[1] >= 4096]
            assert big and all(r["placements"][n] != "R" for n in big), (key, {n: r["placements"][n] for n in big})
