"""Fit a plan to a graph that differs from the one it was made for only in layout-only ops.

A plan made on the meta device may name a ``contiguous`` node that the real model's graph
lacks, or the other way round (see ``autotp.io.fingerprint``). Every other node carries the plan's
strategy by name; a layout-only node passes its producer's placement through. The plan is then
re-priced on the real graph, so its conversions are the ones the rewriter will emit.
"""
from __future__ import annotations

import logging

from autotp.cost.model import CostModel
from autotp.errors import AutoTPError, PlanMismatchError
from autotp.io.fingerprint import LAYOUT_ONLY_OPS
from autotp.ir.placement import R
from autotp.ir.plan import Plan
from autotp.ir.strategy import MeshStrategy
from autotp.solve.build import build_plan
from autotp.strategies.engine import StrategySpace

log = logging.getLogger(__name__)


def align_plan(plan: Plan, space: StrategySpace, *, fallback_hardware: str = "cpu-gloo") -> Plan:
    """``plan`` itself when its nodes are ``space``'s; else the same layout on ``space``'s nodes.

    Call it after the fingerprints matched: only layout-only nodes may differ.
    """
    if [n.name for n in plan.nodes] == [n.name for n in space.nodes]:
        return plan
    log.info("aligning a plan of %d nodes to a graph of %d (layout-only ops differ)", len(plan.nodes), len(space.nodes))
    return carry_plan(plan, space, fallback_hardware=fallback_hardware)


def carry_plan(plan: Plan, space: StrategySpace, *, fallback_hardware: str = "cpu-gloo") -> Plan:
    """``plan``'s layout on ``space``'s nodes, by name and op, re-priced there.

    ``space`` is a graph that differs from the planned one in layout-only ops, or the same model
    captured at other input sizes (``dynamic_dims``); each strategy must be a candidate there.
    """
    from autotp.cost.model import resolve_hardware

    planned = {n.name: n for n in plan.nodes}
    chosen: dict[str, MeshStrategy] = {}
    replicated = (R,) * space.mesh.ndim
    for node in space.nodes:
        if node.op in LAYOUT_ONLY_OPS and len(node.slots) == 1:
            ref = node.slots[0]
            producer = space.by_name()[ref.node]
            passed = producer.output_placement(chosen[ref.node], ref.index)
            strategy = MeshStrategy((passed,), (passed,))
            if strategy not in node.strategies:
                strategy = MeshStrategy((replicated,), (replicated,))
        elif node.name in planned and planned[node.name].op == node.op:
            strategy = planned[node.name].strategy
        else:
            raise PlanMismatchError(f"the plan does not fit this model: it has no entry for {node.describe()}")
        if strategy not in node.strategies:
            raise PlanMismatchError(f"the plan does not fit this model: {node.describe()} cannot take strategy {strategy}")
        chosen[node.name] = strategy
    try:
        profile = resolve_hardware(plan.hardware)
    except AutoTPError:  # a profile file this machine does not have: the costs are only informative
        profile = resolve_hardware(fallback_hardware)
    cost = CostModel(profile, plan.mesh, training=plan.training, optimizer=plan.optimizer if plan.training else None, overlap=plan.overlap)
    return build_plan(space, chosen, cost, hardware=plan.hardware, memory_budget=plan.memory_budget, status=plan.solver_status, solve_seconds=plan.solve_seconds)
