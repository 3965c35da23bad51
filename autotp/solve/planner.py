"""Solver policy: from a strategy space to a ``Plan``, and the reference layouts priced beside it.

``solve_plan`` solves the ILP, builds the plan and, when the cost model prices collectives'
wake-up, re-solves a few times with each plan's mean gap (``autotp.cost.wake``), keeping the
cheapest. ``replicate_all`` and ``megatron_plan`` are the layouts a user would otherwise write,
priced under the same cost model.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

from autotp.cost.model import CostModel
from autotp.cost.wake import plan_mean_gap_seconds
from autotp.ir.plan import Plan
from autotp.ir.strategy import MeshStrategy
from autotp.solve.build import build_plan
from autotp.solve.ilp import NODE_LIMIT, solve
from autotp.solve.layouts import megatron_layout_of
from autotp.solve.memory import replicated_strategy
from autotp.strategies.engine import StrategySpace

log = logging.getLogger(__name__)

WAKE_ROUNDS = 3  # re-solves at most, each with the last plan's mean gap before a collective


def solve_plan(
    space: StrategySpace,
    cost: CostModel,
    *,
    hardware: str,
    memory_budget: int | None,
    time_limit_s: float = 60.0,
    node_limit: int = NODE_LIMIT,
    solver: str = "cbc",
    pinned: Mapping[str, MeshStrategy] | None = None,
    on_incumbent: Callable[[float, float | None], None] | None = None,
) -> Plan:
    """The solver's plan for ``space`` under ``cost`` (``pinned`` nodes fixed), wake-aware when
    ``cost`` prices wake-up; raises ``InfeasiblePlanError`` when nothing fits ``memory_budget``."""
    solution = solve(space, cost, memory_budget=memory_budget, time_limit_s=time_limit_s, node_limit=node_limit, solver=solver, pinned=pinned, on_incumbent=on_incumbent)
    plan = build_plan(space, solution.chosen(space), cost, hardware=hardware, memory_budget=memory_budget, status=solution.status, solve_seconds=solution.seconds)
    if not cost.prices_wake:
        return plan
    return _wake_aware(plan, space, cost, memory_budget=memory_budget, time_limit_s=time_limit_s, node_limit=node_limit, solver=solver, pinned=pinned)


def _wake_aware(
    plan: Plan, space: StrategySpace, cost: CostModel, *, memory_budget: int | None, time_limit_s: float, node_limit: int, solver: str,
    pinned: Mapping[str, MeshStrategy] | None,
) -> Plan:
    """The cheapest plan, priced from its schedule, of ``plan`` and a few re-solves that charge
    every collective the wake-up at the last plan's mean gap (``autotp.cost.wake``).

    The solver prices edges one by one and cannot see where the other collectives fall. Charging
    them all the wake-up at one gap is the linear stand-in: a plan with one collective after a
    whole step of compute pays a lot for it, one with a collective per block little. A plan
    without collectives gives a new one its whole compute as the gap.
    """
    best, seen = plan, {_choice(plan)}
    for _ in range(WAKE_ROUNDS):
        gap = plan_mean_gap_seconds(plan, space, cost)
        solution = solve(space, replace(cost, assumed_gap_seconds=gap), memory_budget=memory_budget, time_limit_s=time_limit_s, node_limit=node_limit, solver=solver, pinned=pinned)
        plan = build_plan(space, solution.chosen(space), cost, hardware=best.hardware, memory_budget=memory_budget, status=solution.status, solve_seconds=solution.seconds)
        log.info("wake-aware re-solve at a %.3f ms gap: %.3f ms (best so far %.3f ms)", gap * 1e3, plan.total_seconds * 1e3, best.total_seconds * 1e3)
        if plan.total_seconds < best.total_seconds:
            best = plan
        if _choice(plan) in seen:
            break
        seen.add(_choice(plan))
    return best


def _choice(plan: Plan) -> tuple[str, ...]:
    return tuple(str(n.strategy) for n in plan.nodes)


def replicate_all(space: StrategySpace, cost: CostModel, *, hardware: str) -> Plan:
    """Every node at its all-``R`` strategy: the unsplit model on every rank."""
    chosen = {node.name: replicated_strategy(node) for node in space.nodes}
    return build_plan(space, chosen, cost, hardware=hardware, memory_budget=None)


def megatron_plan(space: StrategySpace, cost: CostModel, *, hardware: str) -> tuple[Plan | None, str]:
    """Megatron-LM's layout of the attentions and MLPs in the graph, and what it split; ``None``
    and why when there are none.

    The found linears are pinned column/row parallel; the solver places everything else around
    them, without the memory budget (a hand layout need not fit it).
    """
    layout = megatron_layout_of(space)
    if not layout.found:
        return None, "not applicable: the graph has no attention core or MLP (linears joined by pointwise ops) to split"
    return solve_plan(space, cost, hardware=hardware, memory_budget=None, pinned=layout.pins), layout.describe(space)
