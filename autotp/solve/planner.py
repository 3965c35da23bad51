"""Solver policy: from a strategy space to a ``Plan``, and the reference layouts priced beside it.

``solve_plan`` solves the ILP, builds the plan and, when the cost model prices collectives'
wake-up, re-solves a few times with each plan's mean gap (``autotp.cost.wake``), keeping the
cheapest. On an N-D mesh the ILP over every combination of per-axis strategies grows as their
product (a LLaMA-3-8B block on (2, 4): 59k variables, 83 s), so it is searched by neighbourhoods
(``_axis_neighbourhood_search``). ``replicate_all`` and ``megatron_plan`` are the layouts a user would otherwise write,
priced under the same cost model.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from autotp.cost.model import CostModel
from autotp.cost.wake import plan_mean_gap_seconds
from autotp.errors import ConfigError
from autotp.ir.placement import R
from autotp.ir.plan import Plan
from autotp.ir.strategy import MeshStrategy
from autotp.solve.build import build_plan
from autotp.solve.ilp import NODE_LIMIT, Solution, solve
from autotp.solve.layouts import megatron_layout_of
from autotp.solve.memory import check_budget, fallback_choice, replicated_strategy
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace

log = logging.getLogger(__name__)

WAKE_ROUNDS = 3  # re-solves at most, each with the last plan's mean gap before a collective
NEIGHBOURHOOD_ROUNDS = 6  # N-D meshes: neighbourhood ILPs at most (two or three usually settle it)
# N-D meshes: each neighbourhood ILP stops within this relative gap of its bound. Proving the last
# 0.5% of a LLaMA-3-8B round on (8, 8) took 100+ branch-and-bound nodes (23 s of a 38 s plan).
NEIGHBOURHOOD_GAP = 0.01


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
    _check_limits(time_limit_s, node_limit)
    solution = _solve(space, cost, memory_budget=memory_budget, time_limit_s=time_limit_s, node_limit=node_limit, solver=solver, pinned=pinned, on_incumbent=on_incumbent)
    plan = build_plan(space, solution.chosen(space), cost, hardware=hardware, memory_budget=memory_budget, status=solution.status, solve_seconds=solution.seconds)
    if not cost.prices_wake:
        return plan
    return _wake_aware(plan, space, cost, memory_budget=memory_budget, time_limit_s=time_limit_s, node_limit=node_limit, solver=solver, pinned=pinned)


def _check_limits(time_limit_s: float, node_limit: int) -> None:
    """``ConfigError`` for limits the solver would misread (NaN seconds, a node limit below 1)
    rather than a plan that looks infeasible; 0 seconds is allowed: the fallback plan, at once."""
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) or not 0 <= time_limit_s < math.inf:
        raise ConfigError(f"time_limit_s must be a finite number of seconds >= 0, got {time_limit_s!r}")
    if isinstance(node_limit, bool) or not isinstance(node_limit, int) or node_limit < 1:
        raise ConfigError(f"node_limit must be a whole number of branch-and-bound nodes of at least 1, got {node_limit!r}")


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
        solution = _solve(space, replace(cost, assumed_gap_seconds=gap), memory_budget=memory_budget, time_limit_s=time_limit_s, node_limit=node_limit, solver=solver, pinned=pinned)
        plan = build_plan(space, solution.chosen(space), cost, hardware=best.hardware, memory_budget=memory_budget, status=solution.status, solve_seconds=solution.seconds)
        log.info("wake-aware re-solve at a %.3f ms gap: %.3f ms (best so far %.3f ms)", gap * 1e3, plan.total_seconds * 1e3, best.total_seconds * 1e3)
        if plan.total_seconds < best.total_seconds:
            best = plan
        if _choice(plan) in seen:
            break
        seen.add(_choice(plan))
    return best


def _solve(space: StrategySpace, cost: CostModel, **options: Any) -> Solution:
    """The ILP on a 1-D mesh; the neighbourhood search on an N-D one."""
    if space.mesh.ndim == 1:
        return solve(space, cost, **options)
    return _axis_neighbourhood_search(space, cost, **options)


def _axis_neighbourhood_search(
    space: StrategySpace, cost: CostModel, *, memory_budget: float | None, pinned: Mapping[str, MeshStrategy] | None = None,
    on_incumbent: Callable[[float, float | None], None] | None = None, **options: Any,
) -> Solution:
    """Solve an N-D space by large neighbourhoods: each round's ILP lets every op keep its strategy
    or change it on ONE mesh axis (any axis, a different one per op if it likes), while parameters
    may take any placement; repeat from the new plan until it stops improving.

    Where it starts decides which local optimum it reaches: from all-``R``, an (inter-node,
    intra-node) mesh first takes data parallelism on the cheap intra-node axis and then can only
    add tensor parallelism across nodes. So it starts from several plans, runs one round from
    each and goes on from the best: the deterministic fallback plan (which fits any feasible
    budget) and, per axis, the best plan that splits work over that axis alone.

    Each round's ILP is about the sum of the per-axis spaces, not their product: a few 1-D solves'
    worth. The result is within ``NEIGHBOURHOOD_GAP`` of the best plan one axis-move away from it,
    not proven globally optimal; the status says so.
    """
    pinned = dict(pinned or {})
    if memory_budget is not None:
        check_budget(space, cost, memory_budget, pinned)
    options = {**options, "memory_budget": memory_budget, "pinned": pinned, "gap": NEIGHBOURHOOD_GAP}
    seconds = 0.0
    starts: list[tuple[str, Mapping[str, MeshStrategy], bool]] = [("the fallback plan", fallback_choice(space, cost, memory_budget=memory_budget, pinned=pinned), False)]
    for axis, size in enumerate(space.mesh.shape):
        if size > 1:
            alone = _one_axis(space, axis, pinned)
            solution = solve(alone, cost, **options)
            seconds += solution.seconds
            starts.append((f"axis {space.mesh.names[axis]} alone", solution.chosen(alone), True))
    best: Solution | None = None
    for name, start, warm in starts:  # one round from each start
        restricted = _neighbourhood(space, start, pinned)
        solution = solve(restricted, cost, start=start if warm else None, on_incumbent=on_incumbent, **options)
        seconds += solution.seconds
        log.info("neighbourhood round 1 from %s: %d variables, %s, %.3f ms in %.2fs", name, solution.n_variables, solution.status, solution.objective_seconds * 1e3, solution.seconds)
        if best is None or solution.objective_seconds < best.objective_seconds:
            best, chosen, statuses = solution, solution.chosen(restricted), [solution.status]
    assert best is not None
    for round_ in range(2, NEIGHBOURHOOD_ROUNDS + 1):
        restricted = _neighbourhood(space, chosen, pinned)
        solution = solve(restricted, cost, start=chosen, on_incumbent=on_incumbent, **options)
        seconds += solution.seconds
        statuses.append(solution.status)
        log.info("neighbourhood round %d: %d variables, %s, %.3f ms in %.2fs", round_, solution.n_variables, solution.status, solution.objective_seconds * 1e3, solution.seconds)
        improved = solution.objective_seconds < best.objective_seconds * (1 - NEIGHBOURHOOD_GAP / 10)  # under 0.1% better: settled
        if solution.objective_seconds <= best.objective_seconds:
            best, chosen = solution, solution.chosen(restricted)
        if not improved:
            break
    rounds = len(statuses)
    exact = all(status == "optimal" for status in statuses)
    status = f"neighbourhood search ({rounds} rounds, each within {NEIGHBOURHOOD_GAP:.0%})" if exact else f"neighbourhood search ({rounds} rounds, last {statuses[-1]})"
    return replace(best, choice={n.name: n.strategies.index(chosen[n.name]) for n in space.nodes}, status=status, seconds=seconds)


def _one_axis(space: StrategySpace, axis: int, pinned: Mapping[str, MeshStrategy]) -> StrategySpace:
    """``space`` with each op cut to the strategies that replicate on every axis but ``axis``
    (parameters, buffers and pinned nodes keep theirs)."""
    def alone(s: MeshStrategy, node: NodeSpace) -> bool:
        return all(p == R for ps in (*s.inputs, *s.outputs) for a, p in enumerate(ps) if a != axis)

    return _restricted(space, pinned, alone)


def _neighbourhood(space: StrategySpace, chosen: Mapping[str, MeshStrategy], pinned: Mapping[str, MeshStrategy]) -> StrategySpace:
    """``space`` with each op's strategies cut to ``chosen``'s and those differing from it on one
    axis only; parameters, buffers and pinned nodes keep theirs."""
    return _restricted(space, pinned, lambda s, node: _axes_changed(s, chosen[node.name]) <= 1)


def _restricted(space: StrategySpace, pinned: Mapping[str, MeshStrategy], keep: Callable[[MeshStrategy, NodeSpace], bool]) -> StrategySpace:
    """``space`` with each op's strategies cut to those ``keep(strategy, node)`` accepts."""
    nodes = []
    for node in space.nodes:
        if node.kind is NodeKind.STATE or node.name in pinned or len(node.strategies) == 1:
            nodes.append(node)
            continue
        kept = [i for i, s in enumerate(node.strategies) if keep(s, node)]
        nodes.append(replace(
            node, strategies=tuple(node.strategies[i] for i in kept),
            internal_comm=tuple(node.internal_comm[i] for i in kept) if node.internal_comm else (),
        ))
    return replace(space, nodes=tuple(nodes))


def _axes_changed(strategy: MeshStrategy, current: MeshStrategy) -> int:
    return sum(strategy.axis(a) != current.axis(a) for a in range(current.ndim))


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
