"""Planning under a memory budget: toy Hugging Face decoders solve to optimality within 10 s, a
stopped search gives the same plan every time, and an infeasible budget names what binds.

One process, no ranks. The toys are ``build_hf_model``'s LLaMA, Mistral, Qwen2 and Phi-3
(2 layers, hidden 64, 4 heads, 2 key/value heads), planned for inference on 2 ranks at the default
hardware (h100-sxm) under 0.6 x their parameter bytes; the stopping tests use a Qwen2 of the same
size on cpu-gloo prices, whose search takes about a hundred branch-and-bound nodes.
"""
from __future__ import annotations

import functools
import warnings

import pytest

from autotp.capture.export import capture
from autotp.cost.model import CostModel, resolve_hardware
from autotp.errors import InfeasiblePlanError, SolverTimeLimitWarning
from autotp.ir.placement import R
from autotp.solve.ilp import solve
from autotp.solve.memory import min_state_nbytes, state_nbytes
from autotp.strategies.engine import NodeKind, StrategySpace, UnsupportedOpWarning, build_strategy_space
from tests._hf_fns import build_hf_model

TP = 2
BUDGET_FACTOR = 0.6  # of the parameter bytes: more than the 0.5 floor, so most weights must split


@functools.cache
def _space(name: str) -> tuple[StrategySpace, int]:
    """The toy's strategy space and its parameter bytes."""
    model, inputs = build_hf_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        space = build_strategy_space(capture(model, inputs), TP)
    return space, sum(p.numel() * p.element_size() for p in model.parameters())


def _cost(hardware: str = "h100-sxm") -> CostModel:
    return CostModel(resolve_hardware(hardware), TP, training=False, optimizer=None)


def _held(space: StrategySpace, cost: CostModel, choice: dict[str, int]) -> float:
    return sum(
        state_nbytes(n, n.strategies[choice[n.name]].output, cost)  # type: ignore[arg-type]
        for n in space.nodes if n.kind is NodeKind.STATE
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "phi3"])
def test_toy_decoder_under_budget_is_optimal_within_10_s(name: str) -> None:
    space, param_nbytes = _space(name)
    cost = _cost()
    budget = BUDGET_FACTOR * param_nbytes
    solution = solve(space, cost, memory_budget=budget, time_limit_s=10)
    assert solution.status == "optimal"
    assert _held(space, cost, solution.choice) <= budget
    unbudgeted = solve(space, cost, time_limit_s=10)
    assert _held(space, cost, unbudgeted.choice) > budget  # the budget binds: the test exercises it
    assert solution.objective_seconds >= unbudgeted.objective_seconds


@pytest.mark.timeout(300)
@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_node_limit_gives_the_same_incumbent_and_reports_its_gap(solver: str) -> None:
    if solver == "highs":
        pytest.importorskip("highspy")
    space, param_nbytes = _space("qwen2")
    cost = _cost("cpu-gloo")  # collectives dear: this search takes about a hundred nodes to close
    budget = BUDGET_FACTOR * param_nbytes
    first = solve(space, cost, memory_budget=budget, node_limit=5, solver=solver)
    second = solve(space, cost, memory_budget=budget, node_limit=5, solver=solver)
    assert first.status.startswith("feasible (gap ") and first.status.endswith(", 5-node limit)"), first.status
    assert first.choice == second.choice
    assert _held(space, cost, first.choice) <= budget


@pytest.mark.timeout(300)
def test_time_limit_returns_the_deterministic_fallback_with_a_warning() -> None:
    space, param_nbytes = _space("qwen2")
    cost = _cost("cpu-gloo")
    budget = BUDGET_FACTOR * param_nbytes
    plans = []
    for time_limit_s in (0.2, 0.5):  # both stop CBC early, at different points of its search
        with pytest.warns(SolverTimeLimitWarning, match="deterministic fallback plan"):
            solution = solve(space, cost, memory_budget=budget, time_limit_s=time_limit_s)
        assert solution.status == "fallback (time limit)"
        plans.append(solution.choice)
    assert plans[0] == plans[1]
    assert _held(space, cost, plans[0]) <= budget
    ops = [n for n in space.nodes if n.kind is NodeKind.OP]
    assert all(n.strategies[plans[0][n.name]].axis(0).output == R for n in ops)  # every op replicated


@pytest.mark.timeout(300)
def test_pins_that_break_a_budget_above_the_floor_are_named() -> None:
    space, _ = _space("llama")
    cost = _cost()
    floor = min_state_nbytes(space, cost)
    nodes = space.by_name()
    name = "p_lm_head_weight"
    replicated = next(s for s in nodes[name].strategies if s.axis(0).output == R)
    with pytest.raises(InfeasiblePlanError, match=rf"with these pins.*'{name}' pinned to R \(\+32\.00 KiB\).*Unpin or split"):
        solve(space, cost, memory_budget=floor + 1024, pinned={name: replicated})
    solution = solve(space, cost, memory_budget=floor + 1024)  # the same budget without the pin fits
    assert _held(space, cost, solution.choice) <= floor + 1024


@pytest.mark.timeout(300)
def test_every_budget_at_the_floor_is_feasible_without_pins() -> None:
    """The memory row counts state only and a split state reaches any reader by an all-gather,
    so the ILP cannot be infeasible at or above ``min_state_nbytes`` unless pins hold state."""
    space, _ = _space("llama")
    cost = _cost()
    floor = min_state_nbytes(space, cost)
    solution = solve(space, cost, memory_budget=floor, time_limit_s=30)
    assert _held(space, cost, solution.choice) == pytest.approx(floor)
    with pytest.raises(InfeasiblePlanError, match="alone need at least"):
        solve(space, cost, memory_budget=floor - 1)


@pytest.mark.timeout(300)
def test_the_node_limit_reaches_the_solver_from_autotp_plan() -> None:
    import autotp

    model, inputs = build_hf_model("qwen2")
    budget = int(BUDGET_FACTOR * sum(p.numel() * p.element_size() for p in model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        plan = autotp.plan(model, inputs, mesh_shape=(TP,), hardware="cpu-gloo", memory_budget=budget, training=False, node_limit=5)
    assert plan.solver_status.startswith("feasible (gap ") and plan.solver_status.endswith(", 5-node limit)"), plan.solver_status


def test_a_problem_without_choices_is_optimal_not_a_time_limit() -> None:
    """On one rank every node has one strategy: CBC ends an empty problem with its simplex line
    and no "Result" line, which once read as a time-limit stop and returned the fallback."""
    import autotp
    from autotp.examples import build_example

    model, inputs = build_example("mlp", device="meta", d_model=64, d_hidden=256, n_layers=2, batch=2, seq=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverTimeLimitWarning)
        plan = autotp.plan(model, inputs, mesh_shape=(1,), hardware="cpu-gloo", training=False)
    assert plan.solver_status == "optimal"
