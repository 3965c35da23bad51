"""Turn a chosen strategy per node into a ``Plan``: its conversions (``conversion_sites``), their
prices, the wake-up of each collective after the compute before it, and the state each device holds."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace

from autotp.comm.conversions import GradSyncSite, Site, conversion_sites, sites_by_consumer
from autotp.cost.model import CostModel, split_count
from autotp.cost.wake import collective_gaps
from autotp.io.fingerprint import space_fingerprint
from autotp.ir.placement import Placements
from autotp.ir.plan import Conversion, NodePlan, Plan
from autotp.ir.strategy import MeshStrategy
from autotp.ir.values import TensorMeta
from autotp.solve.memory import state_nbytes
from autotp.strategies.engine import NodeKind, StrategySpace


def build_plan(
    space: StrategySpace,
    chosen: Mapping[str, MeshStrategy],
    cost: CostModel,
    *,
    hardware: str,
    memory_budget: int | None,
    status: str = "pinned",
    solve_seconds: float = 0.0,
) -> Plan:
    """The plan of one strategy per node (``chosen``, by node name: a solve's, a pinned layout's
    or a saved plan's), priced by ``cost``; ``status`` says where the choice came from."""
    spaces = space.by_name()
    by_consumer = sites_by_consumer(conversion_sites(space, chosen, training=cost.training))
    plans = [
        NodePlan(
            node.name, node.op, node.module_path, node.kind, chosen[node.name],
            tuple(_conversion(site, spaces[site.value.node].output_value_meta(site.value.index), cost) for site in by_consumer.get(node.name, ())),
            cost.compute_seconds(node, chosen[node.name]),
            inputs=node.slots, output_meta=node.output_meta,
        )
        for node in space.nodes
    ]
    state = [n for n in space.nodes if n.kind is NodeKind.STATE]
    return Plan(
        mesh_shape=space.mesh.shape,
        mesh_axis_names=space.mesh.names,
        inter_node_axes=space.mesh.inter_node_axes,
        hardware=hardware,
        memory_budget=memory_budget,
        nodes=_with_wake(plans, space, cost),
        param_nbytes_per_device=sum(n.output_meta.nbytes / split_count(chosen[n.name].output, space.mesh.shape) for n in state),  # type: ignore[union-attr, misc]
        replicated_param_nbytes=float(sum(n.output_meta.nbytes for n in state)),  # type: ignore[union-attr, misc]
        memory_nbytes_per_device=sum(state_nbytes(n, chosen[n.name].output, cost) for n in state),
        solver_status=status,
        solve_seconds=solve_seconds,
        training=cost.training,
        optimizer=cost.optimizer,
        fingerprint=space_fingerprint(space),
    )


def _with_wake(plans: list[NodePlan], space: StrategySpace, cost: CostModel) -> tuple[NodePlan, ...]:
    """``plans`` with each collective's wake-up for the compute before it added (``autotp.cost.wake``)."""
    if not cost.prices_wake:
        return tuple(plans)
    spaces = space.by_name()
    compute = {n.name: cost.kernel_seconds(spaces[n.name], n.strategy) for n in plans}
    extra: dict[tuple[int, int], float] = defaultdict(float)
    for gap in collective_gaps(plans, space, training=cost.training):
        extra[gap.conversion] += cost.wake_seconds(gap.step, gap.seconds(compute.__getitem__))
    return tuple(
        replace(node, conversions=tuple(
            replace(c, seconds=c.seconds + extra[(i, j)], wake_seconds=extra[(i, j)]) if (i, j) in extra else c
            for j, c in enumerate(node.conversions)
        ))
        for i, node in enumerate(plans)
    )


def _conversion(site: Site, meta: TensorMeta, cost: CostModel) -> Conversion:
    """The plan's record of one site, priced by ``cost`` (a sync that is not priced costs 0)."""
    priced = site.priced_steps
    if isinstance(site, GradSyncSite):
        src: Placements = site.placements
        dst: Placements = site.placements
        steps = site.conjugate
    else:
        src, dst, steps = site.src, site.dst, site.forward
    return Conversion(
        value=site.value, src=src, dst=dst, steps=steps, nbytes=meta.nbytes,
        bytes_per_rank=cost.priced_bytes_per_rank(priced, meta),
        seconds=cost.priced_seconds(priced, meta),
        backward_only=isinstance(site, GradSyncSite),
    )
