"""Symbolic costs in the batch size and sequence length, crossovers, and activation memory."""
from __future__ import annotations

import functools
from fractions import Fraction
from pathlib import Path

import pytest
import sympy
import torch
from torch import nn

from cost_models import HardwareProfile, write_profile
import autotp
from autotp.api import plan_model
from autotp.capture.export import capture
from autotp.cost.model import CostModel, resolve_hardware
from autotp.cost.symbolic import B, T, _fit, attach_cost_terms, fit_work, resize_inputs
from autotp.errors import ConfigError
from autotp.examples import build_example
from autotp.ir.plan import Plan
from autotp.report.crossover import crossovers
from autotp.solve.build import build_plan
from autotp.solve.ilp import solve
from autotp.solve.layouts import megatron_pins
from autotp.strategies.engine import NodeKind, StrategySpace, build_strategy_space

# ---------------------------------------------------------------------------------------------
# Polynomial fits


def test_fit_recovers_a_polynomial_exactly() -> None:
    # 3 + 2T + T² + 5B + 7BT + ½BT²
    basis = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2))
    coeffs = (3, 2, 1, 5, 7, Fraction(1, 2))
    points = [(b, t) for b in (4, 5) for t in (16, 15, 14)]
    values = [float(sum(c * b**i * t**j for (i, j), c in zip(basis, coeffs))) for b, t in points]
    poly = _fit(basis, points, values)
    assert dict(poly.terms) == dict(zip(basis, map(Fraction, coeffs)))
    assert poly(6, 13) == 3 + 2 * 13 + 13**2 + 5 * 6 + 7 * 6 * 13 + 6 * 13**2 / 2
    assert sympy.expand(poly.expr() - (3 + 2 * T + T**2 + 5 * B + 7 * B * T + sympy.Rational(1, 2) * B * T**2)) == 0


# ---------------------------------------------------------------------------------------------
# cost_expression


@pytest.mark.parametrize(("example", "training"), [("gpt", False), ("llama", True)])
def test_cost_expression_equals_total_seconds_at_the_planned_size(example: str, training: bool) -> None:
    model, inputs = build_example(example, device="meta", batch=4, seq=16)
    plan = autotp.plan(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", training=training, symbolic=True)
    expr = plan.cost_expression()
    assert expr.free_symbols == {B, T}
    assert float(expr.subs({B: 4, T: 16})) == pytest.approx(plan.total_seconds + plan.hidden_seconds, rel=1e-9)  # overlap is not symbolic


def _pin_all(plan: Plan, batch: int, seq: int, example: str = "gpt", **config) -> Plan:
    """``plan``'s strategies re-priced by the planner itself on the model captured at (batch, seq),
    without overlap, as the symbolic cost prices them."""
    model, inputs = build_example(example, device="meta", batch=batch, seq=seq, **config)
    result = plan_model(model, inputs, mesh_shape=plan.mesh_shape, hardware=plan.hardware, memory_budget=None, training=plan.training, optimizer=plan.optimizer)
    cost = CostModel(resolve_hardware(plan.hardware), plan.tp_size, training=plan.training, optimizer=plan.optimizer, overlap=False)
    pins = {n.name: n.strategy for n in plan.nodes}
    return build_plan(result.space, solve(result.space, cost, pinned=pins).chosen(result.space), cost, hardware=plan.hardware, memory_budget=None)


def plan_on_a_user_profile(profile: HardwareProfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, training: bool) -> Plan:
    """GPT (batch 4, seq 16) planned on 2 ranks with cost terms, ``profile`` found by name in a
    user profile directory (as ``_pin_all`` re-plans by name)."""
    monkeypatch.setenv("AUTOTP_PROFILE_DIR", str(tmp_path))
    write_profile(profile, tmp_path / f"{profile.name}.toml")
    model, inputs = build_example("gpt", device="meta", batch=4, seq=16)
    return autotp.plan(model, inputs, mesh_shape=(2,), hardware=profile.name, training=training, symbolic=True)


def assert_expression_prices_as_the_planner(plan: Plan) -> None:
    """``plan.cost_expression()`` equals the plan's total at (4, 16) and the planner's price at two other sizes."""
    expr = plan.cost_expression()
    assert float(expr.subs({B: 4, T: 16})) == pytest.approx(plan.total_seconds + plan.hidden_seconds, rel=1e-9)  # overlap is not symbolic
    for batch, seq in ((8, 32), (2, 64)):
        assert float(expr.subs({B: batch, T: seq})) == pytest.approx(_pin_all(plan, batch, seq).total_seconds, rel=1e-9)


@pytest.mark.parametrize("training", [False, True])
def test_cost_expression_prices_the_plan_at_other_sizes(training: bool) -> None:
    """Substituting (B, T) gives what the planner charges for the same strategies at that size."""
    model, inputs = build_example("gpt", device="meta", batch=4, seq=16)
    plan = autotp.plan(model, inputs, mesh_shape=(2,), hardware="a100-pcie", training=training, symbolic=True)
    expr = plan.cost_expression()
    for batch, seq in ((8, 32), (2, 64), (16, 8)):
        expected = _pin_all(plan, batch, seq).total_seconds
        assert float(expr.subs({B: batch, T: seq})) == pytest.approx(expected, rel=1e-9), (batch, seq)


def test_attention_makes_the_expression_quadratic_in_t() -> None:
    model, inputs = build_example("gpt", device="meta", batch=2, seq=16, n_layer=1)
    plan = autotp.plan(model, inputs, mesh_shape=(2,), hardware="h100-sxm", training=False, symbolic=True)
    sdpa = [t for t in plan.cost_terms if hasattr(t, "flops") and "scaled_dot_product" in plan.node(t.node).op]
    assert sdpa and sympy.degree(sdpa[0].flops.expr(), T) == 2 and sympy.degree(sdpa[0].flops.expr(), B) == 1


def test_plan_without_terms_says_how_to_get_them() -> None:
    model, inputs = build_example("mlp", device="meta")
    plan = autotp.plan(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", training=False)
    with pytest.raises(ConfigError, match=r"symbolic=True.*attach_cost_terms"):
        plan.cost_expression()
    assert attach_cost_terms(plan, model, inputs).cost_expression().free_symbols == {B, T}


class _Cubic(nn.Module):
    """Work cubic in the sequence length: not a polynomial the fit accepts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        return x.sum() + torch.ones(n * n * n).sum()


def test_work_beyond_quadratic_in_t_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"not a polynomial of degree 1 in the batch and 2 in the sequence length"):
        fit_work(_Cubic(), (torch.ones(2, 8, 4),))
    # as a function of the batch alone it is constant: fine
    assert fit_work(_Cubic(), (torch.ones(2, 8, 4),), seq_dim=None).has_seq is False


def test_resize_inputs() -> None:
    (ids,) = resize_inputs((torch.ones(2, 16, dtype=torch.long),), batch=5, seq=7)
    assert ids.shape == (5, 7) and ids.dtype == torch.long


# ---------------------------------------------------------------------------------------------
# Crossovers: the GPT example on a slow link, training


GPT = dict(n_embd=512, n_head=8, n_layer=1, vocab_size=512, block_size=64)
SEQ, TP, HARDWARE = 32, 4, "a100-pcie"


@functools.cache
def _space(batch: int) -> StrategySpace:
    model, inputs = build_example("gpt", device="meta", batch=batch, seq=SEQ, **GPT)
    return build_strategy_space(capture(model, inputs), TP)


@functools.cache
def _pinned_total(batch: int, layout: str) -> float:
    """The planner's price of one hand layout at ``batch``: replicate-all, Megatron's MLP only, or
    Megatron (without overlap, as ``crossovers`` compares them)."""
    space = _space(batch)
    cost = CostModel(resolve_hardware(HARDWARE), TP, training=True, optimizer="adamw", overlap=False)
    if layout == "replicate":
        pins = {n.name: n.strategies[0] for n in space.nodes if n.kind in (NodeKind.OP, NodeKind.STATE)}
    elif layout == "megatron-mlp":  # attention's linears stay whole
        pins = {name: s for name, s in megatron_pins(space).items() if ".mlp." in space.by_name()[name].module_path}
        pins |= {n.name: n.strategies[0] for n in space.nodes if n.op.startswith("aten.linear") and ".attn." in n.module_path + "."}
    else:
        pins = megatron_pins(space)
    return build_plan(space, solve(space, cost, pinned=pins).chosen(space), cost, hardware=HARDWARE, memory_budget=None).total_seconds


def _first_cheaper(new: str, old: str, lo: int, hi: int) -> int:
    """Smallest batch in (lo, hi] at which layout ``new`` prices below ``old``: bisection on the planner's own prices."""
    assert _pinned_total(lo, new) > _pinned_total(lo, old) and _pinned_total(hi, new) < _pinned_total(hi, old)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _pinned_total(mid, new) < _pinned_total(mid, old) else (mid, hi)
    return hi


def _linears(plan: Plan) -> dict[str, str]:
    return {n.module_path.removeprefix("blocks.0."): str(n.strategy) for n in plan.nodes if n.op.startswith("aten.linear") and n.module_path.startswith("blocks.0.")}


@pytest.fixture(scope="module")
def gpt_crossovers():
    model, inputs = build_example("gpt", device="meta", batch=2, seq=SEQ, **GPT)
    return crossovers(model, inputs, mesh_shape=(TP,), hardware=HARDWARE, batch_range=(1, 64), training=True)


def test_crossovers_go_from_replicate_to_megatron(gpt_crossovers) -> None:
    """Replicate at small batch on PCIe, then Megatron's MLP split, then Megatron's whole layout."""
    first, second = gpt_crossovers
    assert first.below.collectives(backward=True) == []  # replicate-all: no communication
    column, row = "[R, S(0), S(0)] -> S(2)", "[S(2), S(1), P] -> P"
    mlp = _linears(first.above)
    assert mlp["mlp.c_fc"] == column and mlp["mlp.c_proj"] == row and mlp["attn.q_proj"] == "[R, R, R] -> R"
    megatron = _linears(second.above)
    assert all(megatron[f"attn.{p}"] == column for p in ("q_proj", "k_proj", "v_proj"))
    assert megatron["attn.c_proj"] == row and megatron["mlp.c_fc"] == column and megatron["mlp.c_proj"] == row
    assert "2 nodes change strategy" not in gpt_crossovers.summary() and "at batch" in gpt_crossovers.summary()


def test_crossover_batches_match_an_independent_bisection(gpt_crossovers) -> None:
    first, second = gpt_crossovers
    expected_first = _first_cheaper("megatron-mlp", "replicate", 1, 64)
    expected_second = _first_cheaper("megatron", "megatron-mlp", expected_first, 64)
    assert (first.batch_below, first.batch_above) == (expected_first - 1, expected_first)
    assert (second.batch_below, second.batch_above) == (expected_second - 1, expected_second)
    for c in (first, second):  # the exact crossing lies between the integers, where the two costs meet
        assert c.batch_below < c.batch_exact <= c.batch_above


def test_crossovers_validate_their_range() -> None:
    model, inputs = build_example("mlp", device="meta")
    assert autotp.crossovers is crossovers
    with pytest.raises(ConfigError, match="batch_range"):
        autotp.crossovers(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", batch_range=(8, 4))


# ---------------------------------------------------------------------------------------------
# Activation memory: a liveness walk, checked by hand on the MLP example


def test_activation_memory_by_hand() -> None:
    # x (2, 8, 64) fp32 = 4 KiB; fc1 and gelu (2, 8, 256) = 16 KiB each; fc2 and add 4 KiB.
    # Replicated, the peak is at gelu: x (read again by the residual add) + fc1 + gelu.
    model, inputs = build_example("mlp", device="meta", d_model=64, d_hidden=256, n_layers=2, batch=2, seq=8)
    whole = autotp.plan(model, inputs, mesh_shape=(1,), hardware="cpu-gloo", training=False)
    assert whole.activation_nbytes_per_device == 4096 + 16384 + 16384
    # Megatron on 2 ranks: fc1 and gelu are split on features (8 KiB each), so 4 + 8 + 8 KiB.
    result = plan_model(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget=None, training=False)
    cost = CostModel(resolve_hardware("cpu-gloo"), 2)
    pins = megatron_pins(result.space)
    megatron = build_plan(result.space, solve(result.space, cost, pinned=pins).chosen(result.space), cost, hardware="cpu-gloo", memory_budget=None)
    assert megatron.activation_nbytes_per_device == 4096 + 8192 + 8192
    # Training keeps every op output for the backward: 2 blocks x (16 + 16 + 4 + 4) KiB.
    training = autotp.plan(model, inputs, mesh_shape=(1,), hardware="cpu-gloo", training=True)
    assert training.activation_nbytes_per_device == 2 * (16384 + 16384 + 4096 + 4096)
    assert "largest live activations per device: 36.00 KiB (forward)" in whole.summary()
