"""Why the solver chose a node's strategy: every candidate priced with its neighbours held fixed.

For node n and each candidate strategy s, with every other node at the plan's choice:

    compute(s)                 the roofline estimate of n under s (forward + backward if training)
    inputs(s)  = Σ_slots       transition(producer's chosen placements -> s.inputs[slot])
                               + the backward all-reduce, over each mesh axis where it is R,
                                 of an input read whole by work split over that axis
    outputs(s) = Σ_q           transition(s's output placement -> q) for each distinct placement
                               q n's consumers read it as

Conversions are counted as the ILP counts them: once per value and target placement, so a
conversion another consumer already pays costs this node nothing. ``compute + inputs + outputs``
is then exactly the change in the ILP objective if n alone switched to s. The solver's choice
is therefore the cheapest candidate, unless a cheaper one breaks the memory budget (parameters)
or the solver stopped before proving optimality; the explanation says which.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from autotp.comm.conversions import grad_sync_axes
from autotp.comm.redistribute import grad_sync_step, transition
from autotp.cost.model import CostModel
from autotp.errors import ConfigError
from autotp.ir.placement import Placements, format_placements
from autotp.ir.plan import Plan, axes_suffix, step_label
from autotp.ir.strategy import MeshStrategy
from autotp.ir.units import fmt_nbytes, fmt_seconds
from autotp.ir.values import TensorMeta, ValueRef, format_value
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace

_REL_TOL = 1e-9


@dataclass(frozen=True, slots=True)
class Transfer:
    """One conversion a candidate implies, with its price."""

    value: ValueRef
    src: Placements
    dst: Placements
    seconds: float | None  # None: the transition table does not offer src -> dst
    nbytes: int
    kind: str
    shared: bool = False  # another consumer already pays for it

    def describe(self) -> str:
        src, dst = format_placements(self.src), format_placements(self.dst)
        if self.seconds is None:
            return f"{self.value}: {src}->{dst} is not offered"
        price = "already paid by another consumer" if self.shared else fmt_seconds(self.seconds)
        return f"{self.value}: {self.kind} {src}->{dst} {fmt_nbytes(self.nbytes)}, {price}"


@dataclass(frozen=True, slots=True)
class Candidate:
    index: int
    strategy: MeshStrategy
    compute_seconds: float
    inputs: tuple[Transfer, ...]
    outputs: tuple[Transfer, ...]
    memory_nbytes: float | None  # per device, for parameters and buffers
    chosen: bool

    @property
    def feasible(self) -> bool:
        return all(t.seconds is not None for t in (*self.inputs, *self.outputs))

    @property
    def input_seconds(self) -> float:
        return sum(t.seconds or 0.0 for t in self.inputs if not t.shared)

    @property
    def output_seconds(self) -> float:
        return sum(t.seconds or 0.0 for t in self.outputs if not t.shared)

    @property
    def total_seconds(self) -> float:
        return self.compute_seconds + self.input_seconds + self.output_seconds if self.feasible else float("inf")


@dataclass(frozen=True, slots=True)
class Explanation:
    name: str
    op: str
    module_path: str
    kind: NodeKind
    value: str
    candidates: tuple[Candidate, ...]
    verdict: str

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.chosen)


def find_nodes(space: StrategySpace, *, node: str | None = None, module: str | None = None) -> list[NodeSpace]:
    """The node called ``node``, or the nodes of module ``module`` that have a choice to explain."""
    if node is not None:
        found = space.by_name().get(node)
        if found is None:
            close = difflib.get_close_matches(node, [n.name for n in space.nodes], n=3)
            raise ConfigError(f"no node named {node!r} in this model's graph" + (f"; did you mean {', '.join(close)}?" if close else "; run `autotp plan TARGET --format json` to list the nodes"))
        return [found]
    if module is None:
        raise ConfigError("give --node NAME or --module PATH")
    nodes = [n for n in space.nodes if n.module_path == module and len(n.strategies) > 1]
    if not nodes:
        paths = sorted({n.module_path for n in space.nodes if n.module_path})
        close = difflib.get_close_matches(module, paths, n=3)
        raise ConfigError(f"no node with a choice of strategies in module {module!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return nodes


def explain_node(space: StrategySpace, plan: Plan, cost: CostModel, name: str) -> Explanation:
    """Every candidate of node ``name`` priced against the plan's choices for its neighbours."""
    nodes = space.by_name()
    node = nodes[name]
    chosen = {n.name: plan.node(n.name).strategy for n in space.nodes}
    readers = _readers(space)
    candidates = []
    for i, s in enumerate(node.strategies):
        memory = None
        if node.kind is NodeKind.STATE and isinstance(node.output_meta, TensorMeta):
            memory = cost.state_nbytes(node.output_meta, s.output, is_parameter=node.is_parameter)
        candidates.append(Candidate(
            index=i, strategy=s, compute_seconds=cost.compute_seconds(node, s),
            inputs=tuple(_input_transfers(node, s, nodes, chosen, readers, cost)),
            outputs=tuple(_output_transfers(node, s, nodes, chosen, readers, cost)),
            memory_nbytes=memory, chosen=s == chosen[name],
        ))
    return Explanation(
        name=node.name, op=node.op, module_path=node.module_path, kind=node.kind,
        value=format_value(node.output_meta), candidates=tuple(candidates),
        verdict=_verdict(candidates, plan, node),
    )


def _readers(space: StrategySpace) -> dict[ValueRef, list[tuple[NodeSpace, int]]]:
    readers: dict[ValueRef, list[tuple[NodeSpace, int]]] = {}
    for n in space.nodes:
        for slot, ref in enumerate(n.slots):
            readers.setdefault(ref, []).append((n, slot))
    return readers


def _transfer(ref: ValueRef, src: Placements, dst: Placements, meta: TensorMeta, cost: CostModel, *, requires_grad: bool, shared: bool = False) -> Transfer:
    steps = transition(src, dst)
    kind = "+".join(step_label(s) for s in steps) if steps else "-"
    return Transfer(ref, src, dst, cost.transition_seconds(src, dst, meta, requires_grad=requires_grad), meta.nbytes, kind, shared)


def _input_transfers(node, strategy, nodes, chosen, readers, cost) -> list[Transfer]:
    out = []
    for slot, ref in enumerate(node.slots):
        producer = nodes[ref.node]
        src = producer.output_placement(chosen[ref.node], ref.index)
        dst = strategy.inputs[slot]
        meta = producer.output_value_meta(ref.index)
        others = [(c, k) for c, k in readers[ref] if c.name != node.name]
        if src != dst:
            shared = any(chosen[c.name].inputs[k] == dst for c, k in others)
            out.append(_transfer(ref, src, dst, meta, cost, requires_grad=producer.requires_grad, shared=shared))
        axes = grad_sync_axes(strategy, slot, meta)
        if axes:  # one sync per (value, placements read, axes), as conversions.conversion_sites makes them
            sync = cost.grad_sync_seconds(meta, dst, axes, requires_grad=producer.requires_grad)
            shared = any(chosen[c.name].inputs[k] == dst and grad_sync_axes(chosen[c.name], k, meta) == axes for c, k in others)
            name = "grad_all_reduce" + axes_suffix(tuple(grad_sync_step(a) for a in axes))
            kind = f"{name} (backward)" if sync > 0 else f"{name} (only if a gradient flows)"
            out.append(Transfer(ref, dst, dst, sync, meta.nbytes, kind, shared))
    return out


def _output_transfers(node, strategy, nodes, chosen, readers, cost) -> list[Transfer]:
    out = []
    for ref, consumers in readers.items():
        if ref.node != node.name:
            continue
        src = node.output_placement(strategy, ref.index)
        meta = node.output_value_meta(ref.index)
        wanted = {chosen[c.name].inputs[k] for c, k in consumers}
        for dst in sorted(wanted, key=format_placements):
            if dst != src:
                out.append(_transfer(ref, src, dst, meta, cost, requires_grad=node.requires_grad))
    return out


def _verdict(candidates: list[Candidate], plan: Plan, node: NodeSpace) -> str:
    chosen = next(c for c in candidates if c.chosen)
    if len(candidates) == 1:
        return "it has one candidate: no rule offers a split for this op" if node.fallback else "it has one candidate"
    ranked = sorted(candidates, key=lambda c: c.total_seconds)
    best = ranked[0]
    runner = next((c for c in ranked if not c.chosen), None)
    if chosen.total_seconds <= best.total_seconds * (1 + _REL_TOL) + 1e-15:
        if runner is None or runner.total_seconds == float("inf"):
            return "it is the only candidate its neighbours' placements allow"
        gap = runner.total_seconds - chosen.total_seconds
        return (
            f"it is the cheapest of {len(candidates)} candidates given its neighbours' placements; "
            f"the runner-up {runner.strategy} would cost {fmt_seconds(gap)} more"
            + (" (a tie: the solver took the first)" if gap <= chosen.total_seconds * 1e-6 else "")
        )
    saving = chosen.total_seconds - best.total_seconds
    if best.memory_nbytes is not None and chosen.memory_nbytes is not None and plan.memory_budget is not None:
        after = plan.memory_nbytes_per_device - chosen.memory_nbytes + best.memory_nbytes
        if after > plan.memory_budget:
            return (
                f"{best.strategy} would be {fmt_seconds(saving)} faster but would raise memory per device to "
                f"{fmt_nbytes(after)}, over the {fmt_nbytes(plan.memory_budget)} budget"
            )
    if plan.solver_status != "optimal":
        return f"{best.strategy} would be {fmt_seconds(saving)} faster: the solver stopped before proving its plan optimal ({plan.solver_status})"
    return (
        f"{best.strategy} would be {fmt_seconds(saving)} faster with every other node held fixed; the solver's "
        "optimum differs within its tolerance, or the memory budget binds through another parameter"
    )


def format_explanation(exp: Explanation) -> str:
    """The text ``autotp explain`` prints for one node."""
    where = f" in '{exp.module_path}'" if exp.module_path else ""
    lines = [f"node '{exp.name}' ({exp.op}){where} -> {exp.value or '(no value)'}", ""]
    has_memory = any(c.memory_nbytes is not None for c in exp.candidates)
    header = ["", "strategy", "compute", "inputs", "outputs", "total", "vs chosen"] + (["memory/device"] if has_memory else [])
    rows = []
    chosen_total = exp.chosen.total_seconds
    for c in exp.candidates:
        feasible = c.feasible
        row = [
            "*" if c.chosen else "",
            str(c.strategy),
            fmt_seconds(c.compute_seconds),
            fmt_seconds(c.input_seconds) if feasible else "n/a",
            fmt_seconds(c.output_seconds) if feasible else "n/a",
            fmt_seconds(c.total_seconds) if feasible else "not offered",
            ("-" if c.chosen else _delta(c.total_seconds - chosen_total)) if feasible else "",
        ]
        if has_memory:
            row.append(fmt_nbytes(c.memory_nbytes) if c.memory_nbytes is not None else "")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(cell.ljust(w) if k < 2 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths))).rstrip())
    lines += ["", f"chosen: {exp.chosen.strategy}", f"why: {exp.verdict}"]
    for label, c in (("chosen", exp.chosen), ("runner-up", _runner_up(exp))):  # type: ignore[assignment]  # None is skipped
        if c is None:
            continue
        transfers = [f"      in   {t.describe()}" for t in c.inputs] + [f"      out  {t.describe()}" for t in c.outputs]
        if transfers:
            lines.append(f"  {label} {c.strategy} converts:")
            lines += transfers
        else:
            lines.append(f"  {label} {c.strategy} needs no conversions")
    return "\n".join(lines)


def _runner_up(exp: Explanation) -> Candidate | None:
    others = [c for c in exp.candidates if not c.chosen and c.feasible]
    return min(others, key=lambda c: c.total_seconds) if others else None


def _delta(seconds: float) -> str:
    return ("+" if seconds >= 0 else "-") + fmt_seconds(abs(seconds))
