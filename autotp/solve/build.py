"""Turn a chosen strategy per node into a ``Plan``: its conversions (``conversion_sites``), their
prices, the part of each hidden behind compute beside it (``autotp.comm.overlap``), the wake-up of
each collective after the compute before it, and the state each device holds."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace

from autotp.comm.conversions import ConversionSite, GradSyncSite, Site, conversion_sites, sites_by_consumer
from autotp.comm.overlap import OverlapSchedule, overlap_schedule
from autotp.cost.model import CostModel, split_count
from autotp.cost.wake import collective_gaps
from autotp.io.fingerprint import space_fingerprint
from autotp.ir.placement import Placements
from autotp.ir.plan import Conversion, NodePlan, Plan
from autotp.ir.strategy import MeshStrategy
from autotp.ir.values import TensorMeta
from autotp.solve.memory import state_nbytes
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace


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
    sites = conversion_sites(space, chosen, training=cost.training)
    by_consumer = sites_by_consumer(sites)
    schedule = overlap_schedule(space, sites, overlap=cost.overlap)
    plans = [
        NodePlan(
            node.name, node.op, node.module_path, node.kind, chosen[node.name],
            tuple(_conversion(site, spaces[site.value.node].output_value_meta(site.value.index), cost, spaces, chosen, schedule) for site in by_consumer.get(node.name, ())),
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
        overlap=cost.overlap,
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


def _conversion(
    site: Site, meta: TensorMeta, cost: CostModel, spaces: Mapping[str, NodeSpace], chosen: Mapping[str, MeshStrategy], schedule: OverlapSchedule,
) -> Conversion:
    """The plan's record of one site, priced by ``cost`` (a sync that is not priced costs 0), less
    what compute beside it hides (``_hidden_seconds``)."""
    priced = site.priced_steps
    if isinstance(site, GradSyncSite):
        src: Placements = site.placements
        dst: Placements = site.placements
        steps = site.conjugate
    else:
        src, dst, steps = site.src, site.dst, site.forward
    seconds = cost.priced_seconds(priced, meta)
    hidden = _hidden_seconds(site, seconds, meta, cost, spaces, chosen, schedule)
    return Conversion(
        value=site.value, src=src, dst=dst, steps=steps, nbytes=meta.nbytes,
        bytes_per_rank=cost.priced_bytes_per_rank(priced, meta),
        seconds=seconds - hidden,
        backward_only=isinstance(site, GradSyncSite),
        hidden_seconds=hidden,
    )


def _hidden_seconds(
    site: Site, seconds: float, meta: TensorMeta, cost: CostModel, spaces: Mapping[str, NodeSpace], chosen: Mapping[str, MeshStrategy], schedule: OverlapSchedule,
) -> float:
    """The seconds of ``site``'s communication (``seconds`` in all) that ``schedule`` hides behind compute:

    * a gradient sync beside its linears' weight gradients (``schedule.weight_grads``): the
      whole sync against the sum of their forward-sized weight-gradient seconds;
    * a conversion started early (``schedule.forward``): its first step (forward only) against
      the forward compute of the nodes between its start and its first reader.

    Each is ``cost.hidden_seconds(T, C)`` (``cost_models.exposed_seconds`` derives it)."""
    if isinstance(site, GradSyncSite) and site in schedule.weight_grads:
        compute = sum(cost.forward_kernel_seconds(spaces[name], chosen[name]) for name in schedule.weight_grads[site])
        return cost.hidden_seconds(seconds, compute) if seconds > 0 else 0.0
    if isinstance(site, ConversionSite) and site in schedule.forward:
        first = cost.priced_seconds(site.priced_steps[:1], meta)
        compute = sum(cost.forward_kernel_seconds(spaces[name], chosen[name]) for name in schedule.forward[site])
        return cost.hidden_seconds(first, compute)
    return 0.0
