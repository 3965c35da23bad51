"""Training state stays right where the forward is right (issue 21): custom autograd Functions keep
their backward, in-place writes land in the module's buffers, ``scale_grad_by_freq`` counts every
id, and ranks whose replicated weights differ are refused."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from autotp.capture.custom_functions import FunctionCall
from autotp.capture.export import capture
from autotp.errors import CaptureError, PlanMismatchError
from autotp.ir.placement import R, Shard
from autotp.strategies.engine import UnsupportedOpWarning, build_strategy_space
from autotp.testing import run_on_ranks
from tests import _state_fns


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    return run_on_ranks(_state_fns.training_state, 2, list(_state_fns.MODELS), timeout_seconds=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(_state_fns.MODELS))
def test_sharded_training_matches_the_original(reports: list[dict], name: str) -> None:
    for rank, report in enumerate(reports):
        case = report[name]
        assert case["reference_grad_max"] > 1e-3, "the loss must reach the parameters for the comparison to mean anything"
        assert case["split"] and case["collectives"] > 0, f"rank {rank}: {name} was not sharded"
        assert case["forward"] < 1e-5
        assert max(case["grads"].values()) < 1e-6 * max(1.0, case["reference_grad_max"]), case["grads"]
        assert max(case["state"].values()) < 1e-5, case["state"]  # AdamW's step and every buffer


@pytest.mark.timeout(200)
def test_ranks_with_different_weights_are_refused_unless_unchecked() -> None:
    refused = run_on_ranks(_state_fns.different_seeds, 2, True, timeout_seconds=150)
    for outcome in refused:
        assert outcome["error"] == PlanMismatchError.__name__
        assert "on rank 0 and rank 1" in outcome["message"] and "torch.manual_seed" in outcome["message"]
        assert "check_replicas=False" in outcome["message"]
    assert refused[0]["message"] == refused[1]["message"]
    assert run_on_ranks(_state_fns.different_seeds, 2, False, timeout_seconds=150) == [{"error": None}] * 2


def test_a_custom_function_is_one_node_that_runs_its_own_backward() -> None:
    model = _state_fns.QuantisedMLP()
    x = torch.randn(8, 16)
    captured = capture(model, (x,))
    calls = [n for n in captured.graph_module.graph.nodes if isinstance(n.target, FunctionCall)]
    assert len(calls) == 1 and calls[0].target.function is _state_fns.StraightThrough
    assert not any("round" in str(n.target) for n in captured.graph_module.graph.nodes)  # its forward is not inlined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        space = build_strategy_space(captured, 2)
    node = space.by_name()[calls[0].name]
    assert node.op == "autograd_function[StraightThrough]" and node.fallback

    params = dict(model.named_parameters())
    out = captured.graph_module(*(params[gi.fqns[0]] if gi.fqns else x for gi in captured.inputs))[0]
    out.sum().backward()
    graph_grad = params["up.weight"].grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    assert graph_grad.abs().max() > 0 and torch.equal(graph_grad, params["up.weight"].grad)


def test_a_custom_function_returning_a_non_tensor_is_refused_by_name() -> None:
    class WithCount(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x * 2, 3

        @staticmethod
        def backward(ctx, grad, _):  # type: ignore[no-untyped-def, override]
            return grad * 2

    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return WithCount.apply(x)[0]

    with pytest.raises(CaptureError, match="WithCount returns \\(Tensor, int\\).*tensor or a tuple of tensors"):
        capture(Model(), (torch.randn(2, 4),))


def test_values_written_in_place_and_their_readers_stay_replicated() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        space = build_strategy_space(capture(_state_fns.CachedMLP(), (torch.randn(8, 16),)), 2)
    nodes = {n.name: n for n in space.nodes}
    for name in ("b_cache", "b_running_mean", "copy_", "mul_", "add_"):
        assert all(p == R for s in nodes[name].strategies for placements in (*s.inputs, *s.outputs) for p in placements), name
    assert any(isinstance(p, Shard) for s in nodes["p_up_weight"].strategies for p in s.outputs[0])  # the rest still splits


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_frequency_scaled_embedding_offers_only_the_feature_split(scale_grad_by_freq: bool) -> None:
    model = nn.Embedding(64, 32, scale_grad_by_freq=scale_grad_by_freq)
    space = build_strategy_space(capture(model, (torch.randint(0, 64, (4, 12)),)), 2)
    (lookup,) = [n for n in space.nodes if n.op == "aten.embedding.default"]
    weight_splits = {s.inputs[0][0] for s in lookup.strategies}
    id_splits = {s.inputs[1][0] for s in lookup.strategies}
    assert Shard(1) in weight_splits
    assert (Shard(0) in weight_splits, id_splits != {R}) == (not scale_grad_by_freq,) * 2


def test_batch_norm_running_statistics_stay_replicated_in_train_mode_only() -> None:
    """``aten.batch_norm`` updates its running statistics without saying so in its schema (the
    fuzzer's seed 2032: a running_var split by the plan lost its update)."""
    for training in (True, False):
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16)).train(training)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnsupportedOpWarning)
            space = build_strategy_space(capture(model, (torch.randn(4, 8),)), 2)
        stats = [n for n in space.nodes if n.name in ("b_1_running_mean", "b_1_running_var")]
        assert len(stats) == 2
        split = [any(isinstance(p, Shard) for s in n.strategies for p in s.outputs[0]) for n in stats]
        assert split == [not training] * 2
