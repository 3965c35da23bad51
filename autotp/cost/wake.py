"""Each collective's wake-up, priced from where it falls in the plan's schedule.

On gloo over loopback a collective costs more the longer its ranks computed since the one
before it, up to a plateau (``cost_models.WakeCurve``; measured on the 2-core CI VM, a 1 MiB
all-gather took 1.9 ms after 1.1 ms of compute and 3.3 ms after 7 ms, inside a batch-split
GPT). The solver prices every collective as calibration timed it, after calibration's own gap:
what one collective pays depends on where the others fall, which an edge price cannot see.
So when a plan is built, this walks its rank-local program in order (forward nodes, then, for
training, their backward in reverse) and gives every collective the wake-up for the compute
run since the collective before it. Steps repeat back to back, so the first collective's gap
includes the compute after the last one. A plan without collectives, or a link without a wake
curve (datasheet profiles: NCCL queues collectives on the GPU stream), pays nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotp.comm.conversions import conversion_sites, sites_by_consumer
from autotp.comm.redistribute import Step
from autotp.cost.model import BACKWARD_COMPUTE_FACTOR

if TYPE_CHECKING:
    from autotp.cost.model import CostModel
    from autotp.ir.plan import NodePlan, Plan
    from autotp.strategies.engine import StrategySpace

ConversionKey = tuple[int, int]  # (position of the node in the plan, of the conversion on it)


@dataclass(frozen=True, slots=True)
class CollectiveGap:
    """One collective step of the schedule and the compute run since the previous one.

    ``compute`` holds ``(node name, fraction)``: that share of the node's priced compute
    (forward and backward together when training) ran in the gap.
    """

    conversion: ConversionKey
    step: Step
    compute: tuple[tuple[str, float], ...]

    def seconds(self, node_seconds: Callable[[str], float]) -> float:
        return sum(fraction * node_seconds(name) for name, fraction in self.compute)


def collective_gaps(nodes: Sequence[NodePlan], space: StrategySpace, *, training: bool) -> list[CollectiveGap]:
    """Every collective step of one training or inference step, in the order ranks run them.

    A node whose output gets a gradient (``space``'s ``requires_grad``) has its compute
    split 1 : ``BACKWARD_COMPUTE_FACTOR`` between forward and backward (as
    ``autotp.cost.model.CostModel`` prices it); the collectives are the plan's conversion sites
    (``autotp.comm.conversions``), forward steps in order, priced backward steps in reverse. The
    ``(i, j)`` keys are the node's position in ``nodes`` and the site's among its conversions.
    """
    requires_grad = {n.name: n.requires_grad for n in space.nodes}
    sites = sites_by_consumer(conversion_sites(space, {n.name: n.strategy for n in nodes}, training=training))
    events: list[tuple[str, float] | tuple[ConversionKey, Step]] = []
    forward_share = {n.name: 1 / (1 + BACKWARD_COMPUTE_FACTOR) if training and requires_grad.get(n.name, False) else 1.0 for n in nodes}
    for i, node in enumerate(nodes):
        for j, site in enumerate(sites.get(node.name, ())):
            events += [((i, j), step) for step in site.forward if step.kind.is_collective]
        events.append((node.name, forward_share[node.name]))
    if training:
        for i, node in reversed(list(enumerate(nodes))):
            if forward_share[node.name] < 1.0:
                events.append((node.name, 1.0 - forward_share[node.name]))
            for j, site in enumerate(sites.get(node.name, ())):
                events += [((i, j), step) for step in site.backward if step.kind.is_collective]
    collectives = [k for k, (_, what) in enumerate(events) if isinstance(what, Step)]
    if not collectives:
        return []
    gaps = []
    for previous, current in zip([collectives[-1], *collectives[:-1]], collectives):
        between = events[previous + 1:current] if previous < current else events[previous + 1:] + events[:current]
        compute = tuple(e for e in between if isinstance(e[1], float))
        key, step = events[current]
        gaps.append(CollectiveGap(key, step, compute))  # type: ignore[arg-type]
    return gaps


def plan_mean_gap_seconds(plan: Plan, space: StrategySpace, cost: CostModel) -> float:
    """The compute per collective step of ``plan``'s schedule (all of it when it has none).

    What the solver charges each collective's wake-up at when it re-solves (``autotp.api``).
    """
    spaces = space.by_name()
    compute = sum(cost.kernel_seconds(spaces[n.name], n.strategy) for n in plan.nodes)
    steps = collective_gaps(plan.nodes, space, training=cost.training)
    return compute / max(1, len(steps))
