"""State memory per device: what a placement costs, the floor any plan reaches, why a budget cannot
be met, and the plan that always fits one (the solver's time-limit fallback).

Only parameters and buffers (``NodeKind.STATE``) count against a budget, each at the bytes its
placement leaves on one rank (with gradient and optimizer state when training). Every state can
reach its smallest split whatever its readers want, since a split converts back to ``R`` by an
all-gather; so a budget at or above the floor is infeasible only when pinned nodes hold state
above its smallest split, and ``check_budget`` names them.
"""
from __future__ import annotations

from collections.abc import Mapping

from autotp.cost.model import CostModel
from autotp.errors import InfeasiblePlanError
from autotp.ir.placement import Placements, R, format_placements
from autotp.ir.strategy import MeshStrategy
from autotp.ir.units import fmt_nbytes
from autotp.ir.values import TensorMeta
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace


def state_nbytes(node: NodeSpace, placements: Placements, cost: CostModel) -> float:
    """Bytes one rank holds for a parameter/buffer placed as ``placements`` (with its gradient and
    optimizer state when training)."""
    meta = node.output_meta
    assert isinstance(meta, TensorMeta)
    return cost.state_nbytes(meta, placements, is_parameter=node.is_parameter)


def min_state_nbytes(space: StrategySpace, cost: CostModel) -> float:
    """The smallest state memory per device any plan can reach (each state at its best split)."""
    return sum(_smallest(n, cost) for n in space.nodes if n.kind is NodeKind.STATE)


def _whole_state(space: StrategySpace) -> str:
    """Which state tensors no plan can split, for the message that gives the floor."""
    state = [n for n in space.nodes if n.kind is NodeKind.STATE]
    whole = [n for n in state if all(s.replicated for s in n.strategies)]
    if not whole:
        return ""
    largest = max(whole, key=lambda n: n.output_value_meta(None).nbytes)
    return (
        f" ({len(whole)} of {len(state)} tensors, the largest '{largest.name}' {largest.output_value_meta(None).shape}, stay whole: "
        f"no dim of theirs divides by the mesh {space.mesh.shape}, or they are written in place)"
    )


def check_budget(space: StrategySpace, cost: CostModel, budget: float, pinned: Mapping[str, MeshStrategy]) -> None:
    """Raise ``InfeasiblePlanError`` naming what binds when no plan fits ``budget``: the state
    itself (below the floor), or the pinned nodes that hold state above its smallest split."""
    floor = min_state_nbytes(space, cost)
    if floor > budget:
        what = f"parameters, gradients and {cost.optimizer or 'no'} optimizer state" if cost.training else "the parameters and buffers"
        raise InfeasiblePlanError(
            f"no plan fits a memory budget of {fmt_nbytes(budget)} per device on "
            f"{space.mesh.size} ranks: {what} alone need at least "
            f"{fmt_nbytes(floor)} ({floor:.0f} bytes) per device with every one split as far as it can be{_whole_state(space)}. "
            "Raise memory_budget to at least that, or use more ranks"
            + (", or plan with training=False for inference" if cost.training else "")
        )
    nodes = space.by_name()
    excess = {
        name: state_nbytes(nodes[name], strategy.output, cost) - _smallest(nodes[name], cost)
        for name, strategy in pinned.items()
        if name in nodes and nodes[name].kind is NodeKind.STATE
    }
    binding = sorted((name for name, extra in excess.items() if extra > 0), key=lambda name: -excess[name])
    if floor + sum(excess.values()) > budget:
        listed = ", ".join(f"'{name}' pinned to {format_placements(pinned[name].output)} (+{fmt_nbytes(excess[name])})" for name in binding)
        raise InfeasiblePlanError(
            f"no plan fits a memory budget of {fmt_nbytes(budget)} per device on {space.mesh.size} ranks "
            f"with these pins: the state needs {fmt_nbytes(floor)} with every parameter split, and the "
            f"pins hold {fmt_nbytes(sum(excess.values()))} more: {listed}. Unpin or split those, or raise "
            f"memory_budget to at least {fmt_nbytes(floor + sum(excess.values()))}"
        )


def fallback_choice(space: StrategySpace, cost: CostModel, *, memory_budget: float | None, pinned: Mapping[str, MeshStrategy]) -> dict[str, MeshStrategy]:
    """Every node at its all-``R`` strategy (pins kept; a state that an ``fsdp`` axis role keeps split
    at its least split one), then states moved to their smallest split, largest saving first (ties
    in graph order), until the state fits ``memory_budget``.

    The weights that move are all-gathered before use (FSDP-style): slow but always feasible once
    ``check_budget`` passes, and deterministic: the plan returned when the solver stops at its
    time limit.
    """
    chosen = {n.name: pinned.get(n.name) or _start(n, cost) for n in space.nodes}
    if memory_budget is None:
        return chosen
    state = [n for n in space.nodes if n.kind is NodeKind.STATE]
    held = sum((state_nbytes(n, chosen[n.name].output, cost) for n in state), 0.0)
    movable = [n for n in state if n.name not in pinned]
    saving = {n.name: state_nbytes(n, chosen[n.name].output, cost) - _smallest(n, cost) for n in movable}
    for node in sorted(movable, key=lambda n: -saving[n.name]):  # sorted() is stable: ties stay in graph order
        if held <= memory_budget:
            break
        smallest = min(node.strategies, key=lambda s: state_nbytes(node, s.output, cost))
        chosen[node.name] = smallest
        held -= saving[node.name]
    return chosen


def replicated_strategy(node: NodeSpace) -> MeshStrategy:
    """The node's all-``R`` strategy (every op offers one; the engine adds it)."""
    strategy = next((s for s in node.strategies if s.replicated), None)
    if strategy is None:  # every op offers all-R; this guards against a rule that does not
        raise InfeasiblePlanError(f"node '{node.name}' ({node.op}) has no all-replicate strategy to fall back on")
    return strategy


def _start(node: NodeSpace, cost: CostModel) -> MeshStrategy:
    """Where the fallback starts a node: all-``R``; a state whose axis roles forbid that (``fsdp``
    on some axis) at its least split strategy, the first of those in the space's order."""
    if node.kind is NodeKind.STATE and not any(all(p == R for p in s.output) for s in node.strategies):
        return max(node.strategies, key=lambda s: state_nbytes(node, s.output, cost))
    return replicated_strategy(node)


def _smallest(node: NodeSpace, cost: CostModel) -> float:
    return min(state_nbytes(node, s.output, cost) for s in node.strategies)
