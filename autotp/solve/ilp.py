"""Stage 4: pick one strategy per node with an integer linear program (PuLP).

Variables: ``x[n,s] ∈ {0,1}`` (node n uses strategy s), one-hot per node. For a tensor value
v (producer u, output i) the producer's placement is ``y[v,p] = Σ_{s: out_i(s)=p} x[u,s]``. For
each placement q some consumer slot may require of v, ``w[v,q] ∈ [0,1]`` is at least every
consumer's demand ``Σ_{t: slot reads v as q} x[c,t]``: a conversion is paid once per value and
target however many consumers want it (the rewriter shares it too). The demand is met by a flow
``e[v,p,q] ≥ 0`` from the produced placement (Alpa-style; tighter in the LP relaxation than
``e ≥ y + w − 1``, and tighter still with the ``produced`` rows, see ``_produced_goes_somewhere``);
transitions the table does not offer get no flow variable.

    minimise   Σ c_compute(n,s)·x[n,s] + Σ c_transition(v,p,q)·e[v,p,q]
                 + Σ c_sync(v,q)·w[v,q] − Σ credit(c,t)·x[c,t]       (gradient syncs, _grad_sync)
    subject to Σ_s x[n,s] = 1                                   (one_strategy_<n>)
               w[v,q] ≥ demand of each consumer slot            (w_<v>_<q>_<c>)
               Σ_p e[v,p,q] = w[v,q]                            (convert_<v>_<q>)
               e[v,p,q] ≤ y[v,p]                                (supply_<v>_<q>_<p>)
               Σ_q e[v,p,q] ≥ y[v,p]                            (produced_<v>_<p>)
               Σ_{state n} nbytes_local(n,s)·x[n,s] ≤ budget     (memory_budget)

Costs enter in microseconds so solver tolerances do not swallow them.

Stopping, and the same plan for the same inputs: the solver runs single-threaded and stops at
``node_limit`` branch-and-bound nodes, a deterministic amount of work, so its answer does not
depend on the machine's speed: "optimal", or "feasible (gap g%, node limit)" with the incumbent
and its gap to the best bound. ``time_limit_s`` is only a safety net: where the search stopped
there does depend on timing, so the solver's incumbent is discarded and the deterministic
``fallback_choice`` (all-``R``, state split to fit the budget) is returned with a warning and
status "fallback (time limit)"; likewise, "fallback (no incumbent)", when the node limit comes
before any plan. (Given to CBC as a warm start, that plan made it skip the root
heuristics that find near-optimal incumbents: 32% gap instead of 13% after 20 nodes on a toy
Qwen2, so it is not one.)
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pulp

from autotp.comm import overlap
from autotp.comm.conversions import grad_sync_axes
from autotp.cost.model import CostModel
from autotp.errors import InfeasiblePlanError, SolverError, SolverTimeLimitWarning
from autotp.ir.placement import Placements
from autotp.ir.strategy import MeshStrategy
from autotp.ir.values import TensorMeta, ValueRef
from autotp.solve.memory import check_budget, fallback_choice, state_nbytes
from autotp.strategies.blocks import canonical_nodes
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace

log = logging.getLogger(__name__)

_MICRO = 1e6
# Branch-and-bound nodes before the solver stops with its incumbent. The hardest toy measured
# (Hugging Face Qwen2 under 0.6x its parameter bytes, cpu-gloo prices) closes in about 120 nodes
# at 20-60 ms each on a 2-core machine, so 1000 nodes lands inside the default 60 s.
NODE_LIMIT = 1000
_FALLBACK_REASONS = ("time limit", "no incumbent")  # the search gave no reproducible plan

@dataclass(frozen=True, slots=True)
class Solution:
    """The chosen strategy index of every node and how the solve went (``objective_seconds`` is NaN
    for the fallback plan, which the solver did not price; its ``Plan`` does)."""

    choice: dict[str, int]
    objective_seconds: float
    status: str
    seconds: float
    n_variables: int
    n_constraints: int

    def chosen(self, space: StrategySpace) -> dict[str, MeshStrategy]:
        """The chosen strategy of every node of ``space``, by node name."""
        return {n.name: n.strategies[self.choice[n.name]] for n in space.nodes}


def solve(
    space: StrategySpace,
    cost: CostModel,
    *,
    memory_budget: float | None = None,
    time_limit_s: float = 60.0,
    node_limit: int = NODE_LIMIT,
    solver: str = "cbc",
    pinned: Mapping[str, MeshStrategy] | None = None,
    dedup: bool = True,
    on_incumbent: Callable[[float, float | None], None] | None = None,
    start: Mapping[str, MeshStrategy] | None = None,
    gap: float = 0.0,
) -> Solution:
    """Solve the ILP; raise ``InfeasiblePlanError`` naming what binds when no plan fits ``memory_budget``.

    ``pinned`` fixes the strategy of some nodes (a hand layout to price, or a user override).
    ``dedup`` solves repeated identical blocks once (``autotp.strategies.blocks``): they share variables,
    so the ILP does not grow with depth, at the price of giving every repeat the same layout.
    ``node_limit`` and ``time_limit_s`` stop the search (see the module docstring: the first is
    deterministic, the second returns the fallback plan).
    ``on_incumbent(seconds, bound_seconds)`` is called, from another thread, with the objective
    of each better integer solution CBC finds while it runs and its lower bound so far (None
    before it has one), read from its log; other solvers do not call it.
    """
    pinned = pinned or {}
    if memory_budget is not None:
        check_budget(space, cost, memory_budget, pinned)
    started = time.perf_counter()
    canonical = canonical_nodes(space) if dedup else {n.name: n.name for n in space.nodes}
    problem = pulp.LpProblem("autotp", pulp.LpMinimize)
    x = _strategy_variables(problem, space, canonical)
    repeats = Counter(canonical[n.name] for n in space.nodes)
    nodes = space.by_name()
    objective = [
        repeats[name] * cost.compute_seconds(nodes[name], s) * _MICRO * x[name][i]
        for name in repeats
        for i, s in enumerate(nodes[name].strategies)
    ]
    objective += _transition_terms(problem, space, cost, x, canonical)
    if memory_budget is not None:
        _memory_constraint(problem, space, cost, x, canonical, memory_budget)
    _pin(problem, space, x, canonical, pinned)
    problem += pulp.lpSum(objective)
    if start is not None:
        _set_start(problem, space, x, canonical, start, solver=solver, time_limit_s=time_limit_s)
    stop = _run(problem, solver, time_limit_s, node_limit, on_incumbent, warm_start=start is not None, gap=gap)
    if stop.reason in _FALLBACK_REASONS:
        choice, status = _fallback(space, cost, memory_budget, pinned, stop.reason, solver=solver, time_limit_s=time_limit_s, node_limit=node_limit)
    else:
        choice = {n.name: _chosen(x[canonical[n.name]]) for n in space.nodes}
        status = "optimal" if stop.reason == "optimal" else f"feasible (gap {stop.gap:.1%}, {node_limit}-node limit)"
    elapsed = time.perf_counter() - started
    log.info("ILP: %d variables, %d constraints, %s in %.2fs", problem.numVariables(), problem.numConstraints(), status, elapsed)
    return Solution(
        choice=choice,
        objective_seconds=math.nan if stop.reason in _FALLBACK_REASONS else float(pulp.value(problem.objective) or 0.0) / _MICRO,
        status=status,
        seconds=elapsed,
        n_variables=problem.numVariables(),
        n_constraints=problem.numConstraints(),
    )


def _fallback(
    space: StrategySpace, cost: CostModel, memory_budget: float | None, pinned: Mapping[str, MeshStrategy], reason: str, *,
    solver: str, time_limit_s: float, node_limit: int,
) -> tuple[dict[str, int], str]:
    """``fallback_choice`` as strategy indices and its status, with a warning that says why."""
    chosen = fallback_choice(space, cost, memory_budget=memory_budget, pinned=pinned)
    why = (
        f"the {solver} solver hit its {time_limit_s:g}s time limit before its {node_limit}-node limit; where it stopped "
        "depends on timing, so any incumbent is set aside for"
        if reason == "time limit" else f"the {solver} solver found no plan within its {node_limit}-node limit, so this is"
    )
    message = (
        f"{why} the deterministic fallback plan (every op replicated, parameters split to fit the budget and "
        "all-gathered before use). Raise time_limit_s or node_limit for the solver's plan"
    )
    log.warning(message)
    warnings.warn(message, SolverTimeLimitWarning, stacklevel=3)
    return {n.name: n.strategies.index(chosen[n.name]) for n in space.nodes}, f"fallback ({reason})"


def _strategy_variables(problem: pulp.LpProblem, space: StrategySpace, canonical: Mapping[str, str]) -> dict[str, list]:
    """One binary per (representative node, strategy); a single strategy gets the constant 1."""
    x: dict[str, list] = {}
    for k, node in enumerate(space.nodes):
        if canonical[node.name] != node.name:
            continue  # a repeat: it reads its representative's variables
        if len(node.strategies) == 1:
            x[node.name] = [1]
            continue
        vars_ = [problem.add_variable(f"x_{k}_{i}", cat=pulp.LpBinary) for i in range(len(node.strategies))]
        problem += pulp.lpSum(vars_) == 1, f"one_strategy_{k}"
        x[node.name] = vars_
    return x


def _transition_terms(problem: pulp.LpProblem, space: StrategySpace, cost: CostModel, x: dict[str, list], canonical: Mapping[str, str]) -> list:
    """Conversion and gradient-sync costs, built once per distinct (value, readers) and counted."""
    nodes = space.by_name()
    readers: dict[ValueRef, list[tuple[str, int]]] = defaultdict(list)
    for node in space.nodes:
        for slot, ref in enumerate(node.slots):
            readers[ref].append((canonical[node.name], slot))
    distinct: dict[tuple, int] = defaultdict(int)
    for ref, slots in readers.items():
        distinct[(canonical[ref.node], ref.index, tuple(sorted(set(slots))))] += 1
    terms = []
    for v_id, ((producer_name, index, slots), count) in enumerate(distinct.items()):
        producer = nodes[producer_name]
        meta = producer.output_value_meta(index)
        produced: dict[Placements, list[int]] = defaultdict(list)
        for i, s in enumerate(producer.strategies):
            produced[producer.output_placement(s, index)].append(i)
        y = {p: pulp.lpSum(x[producer_name][i] for i in idxs) for p, idxs in produced.items()}
        wanted: dict[Placements, list] = defaultdict(list)
        for consumer, slot in slots:
            by_placement: dict[Placements, list[int]] = defaultdict(list)
            for i, s in enumerate(nodes[consumer].strategies):
                by_placement[s.inputs[slot]].append(i)
            for q, idxs in by_placement.items():
                wanted[q].append(pulp.lpSum(x[consumer][i] for i in idxs))
        value_terms: list = []
        outflow: dict[Placements, list] = defaultdict(list)
        for q_id, (q, demands) in enumerate(wanted.items()):
            if set(produced) != {q}:  # else the producer can only make q: nothing to convert
                value_terms += _conversion_flow(problem, cost, meta, producer.requires_grad, y, q, demands, f"{v_id}_{q_id}", outflow)
        if len(produced) > 1:
            _produced_goes_somewhere(problem, y, outflow, f"{v_id}")
        value_terms += _grad_sync(problem, nodes, cost, x, (producer_name, index), [(nodes[c], slot) for c, slot in slots], meta, producer.requires_grad, f"{v_id}")
        terms += [count * t for t in value_terms]
    return terms


def _demand(problem: pulp.LpProblem, demands: list, name: str) -> pulp.LpAffineExpression:
    """At least every consumer's demand: shared work is paid once however many consumers need it."""
    if len(demands) == 1:
        return demands[0]
    w = problem.add_variable(name, lowBound=0, upBound=1)
    for c_id, demand in enumerate(demands):
        problem += w >= demand, f"{name}_{c_id}"
    return w


def _grad_sync(
    problem: pulp.LpProblem, nodes: Mapping[str, NodeSpace], cost: CostModel, x: dict[str, list], value: tuple[str, int | None],
    readers: list[tuple[NodeSpace, int]], meta: TensorMeta, requires_grad: bool, tag: str,
) -> list:
    """Backward all-reduces of a value's gradient, one per (placements read, axes) some reader needs
    (``conversions.grad_sync_axes``), priced only when a gradient is expected (as
    ``conversions.conversion_sites`` prices them).

    With ``cost.overlap``, a sync over one mesh axis of a value that only linears read as their
    input (``overlap.linears_read_input``, the static half of the plan's rule) runs beside their
    weight gradients: each reader ``c`` under a strategy ``t`` that needs the sync subtracts
    ``cost.weight_grad_credit_seconds`` from the shared term,

        T·w[v,q]  −  Σ_{c,t} x[c,t] · min(C_wgrad(c,t), T / ((1 + slowdown)·k))     (k readers)

    which never falls below ``T − T / (1 + slowdown)`` when the sync runs, and is 0 when it does not."""
    if not (cost.training and requires_grad):
        return []
    demands: dict[tuple[Placements, tuple[int, ...]], list] = defaultdict(list)
    choices: dict[tuple[Placements, tuple[int, ...]], list[tuple[NodeSpace, int]]] = defaultdict(list)
    for node, slot in readers:
        by_key: dict[tuple[Placements, tuple[int, ...]], list[int]] = defaultdict(list)
        for i, s in enumerate(node.strategies):
            axes = grad_sync_axes(s, slot, meta)
            if axes:
                by_key[(s.inputs[slot], axes)].append(i)
        for key, idxs in by_key.items():
            demands[key].append(pulp.lpSum(x[node.name][i] for i in idxs))
            choices[key] += [(node, i) for i in idxs]
    hides = cost.overlap and bool(demands) and overlap.linears_read_input(nodes, value[0], value[1], [(node.name, slot) for node, slot in readers])
    terms = []
    for k, ((placements, axes), key_demands) in enumerate(demands.items()):
        seconds = cost.grad_sync_seconds(meta, placements, axes, requires_grad=requires_grad)
        if seconds <= 0:
            continue
        terms.append(seconds * _MICRO * _demand(problem, key_demands, f"grad_sync_{tag}_{k}"))
        if hides and len(axes) == 1:
            for node, i in choices[(placements, axes)]:
                credit = cost.weight_grad_credit_seconds(node, node.strategies[i], seconds, len(readers))
                if credit > 0:
                    terms.append(-credit * _MICRO * x[node.name][i])
    return terms


def _conversion_flow(
    problem: pulp.LpProblem, cost: CostModel, meta: TensorMeta, requires_grad: bool, y: dict[Placements, object], q: Placements, demands: list, tag: str,
    outflow: dict[Placements, list],
) -> list:
    """Value wanted as ``q`` (``w``) must be supplied from the placement it is produced in; each
    flow is also recorded in ``outflow`` by its source placement."""
    w = _demand(problem, demands, f"w_{tag}")
    flows, terms = [], []
    for p_id, (p, y_p) in enumerate(y.items()):
        seconds = 0.0 if p == q else cost.transition_seconds(p, q, meta, requires_grad=requires_grad)
        if seconds is None:
            continue  # the table offers no p -> q: no flow variable, so y_p and w exclude each other
        e = problem.add_variable(f"e_{tag}_{p_id}", lowBound=0)
        problem += e <= y_p, f"supply_{tag}_{p_id}"
        flows.append(e)
        outflow[p].append(e)
        if seconds > 0:
            terms.append(seconds * _MICRO * e)
    problem += pulp.lpSum(flows) == w, f"convert_{tag}"
    return terms


def _produced_goes_somewhere(problem: pulp.LpProblem, y: dict[Placements, object], outflow: Mapping[Placements, list], tag: str) -> None:
    """``Σ_q e[v,p,q] ≥ y[v,p]``: what is produced as ``p`` feeds at least one wanted placement.

    Valid for every integer plan (the one produced placement supplies every wanted one, and each
    reader wants one). Without it the LP let a fractional producer serve all demand from its
    cheap part: ``y = ½ P + ½ R`` with readers wanting ``½ R + ½ S(0)`` was met free from ``R``
    alone, never paying to reduce the partial sum. On a toy Qwen2 under 0.6x its parameter bytes
    (cpu-gloo prices) the root bound rose from 1810 to 2031 us against a 2199 us optimum.
    """
    for p_id, (p, y_p) in enumerate(y.items()):
        problem += pulp.lpSum(outflow[p]) >= y_p, f"produced_{tag}_{p_id}"


def _set_start(
    problem: pulp.LpProblem, space: StrategySpace, x: dict[str, list], canonical: Mapping[str, str], start: Mapping[str, MeshStrategy],
    *, solver: str, time_limit_s: float,
) -> None:
    """Give the solver ``start`` (a plan of this space) as its first incumbent: every variable's
    value under it, from the problem solved with the strategies fixed (presolve settles it)."""
    fixed = []
    for node in space.nodes:
        if canonical[node.name] != node.name or len(node.strategies) == 1:
            continue
        chosen = node.strategies.index(start[node.name])
        for i, var in enumerate(x[node.name]):
            var.lowBound = var.upBound = 1 if i == chosen else 0
            fixed.append(var)
    _run(problem, solver, time_limit_s, NODE_LIMIT)
    for var in fixed:
        var.lowBound, var.upBound = 0, 1


def _pin(problem: pulp.LpProblem, space: StrategySpace, x: dict[str, list], canonical: Mapping[str, str], pinned: Mapping[str, MeshStrategy]) -> None:
    nodes = space.by_name()
    for name, strategy in pinned.items():
        node = nodes.get(name)
        if node is None:
            raise SolverError(f"cannot pin node '{name}': no such node in the graph")
        if strategy not in node.strategies:
            offered = ", ".join(str(s) for s in node.strategies)
            raise SolverError(f"cannot pin {node.describe()} to {strategy}: it offers {offered}")
        if len(node.strategies) > 1:
            problem += x[canonical[name]][node.strategies.index(strategy)] == 1, f"pinned_{name}"


def _memory_constraint(problem: pulp.LpProblem, space: StrategySpace, cost: CostModel, x: dict[str, list], canonical: Mapping[str, str], budget: float) -> None:
    terms = [
        state_nbytes(n, s.output, cost) * x[canonical[n.name]][i]
        for n in space.nodes
        if n.kind is NodeKind.STATE
        for i, s in enumerate(n.strategies)
    ]
    problem += pulp.lpSum(terms) <= budget, "memory_budget"


@dataclass(frozen=True, slots=True)
class _Stop:
    """Why the search ended: "optimal", "node limit" (deterministic), "no incumbent" (the node limit
    came before any plan) or "time limit" (not deterministic), and the relative gap between the
    incumbent and the best bound when it had not closed."""

    reason: str
    gap: float = 0.0


def _run(
    problem: pulp.LpProblem, solver: str, time_limit_s: float, node_limit: int,
    on_incumbent: Callable[[float, float | None], None] | None = None, *, warm_start: bool = False, gap: float = 0.0,
) -> _Stop:
    if solver not in ("cbc", "highs"):
        raise SolverError(f"unknown solver {solver!r}; use 'cbc' or 'highs'")
    if solver == "highs":
        backend = pulp.HiGHS(msg=False, timeLimit=time_limit_s, threads=1, mip_max_nodes=node_limit, mip_rel_gap=gap)
        try:
            _solve_with(problem, backend, solver)
        except KeyError:  # PuLP 3.3 has no status for HiGHS's node limit (kSolutionLimit): read the incumbent here
            _read_highs_incumbent(problem)
        return _checked(problem, _highs_stop(problem), solver)
    with tempfile.TemporaryDirectory(prefix="autotp-cbc-") as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC; it still ships and works
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            backend = pulp.PULP_CBC_CMD(
                msg=False, timeLimit=time_limit_s, threads=1, maxNodes=node_limit, logPath=log_path, warmStart=warm_start, gapRel=gap or None,
            )
        if on_incumbent is None:
            _solve_with(problem, backend, solver)
        else:
            with _IncumbentTail(log_path, on_incumbent):
                _solve_with(problem, backend, solver)
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return _checked(problem, _cbc_stop(f.read()), solver)


def _checked(problem: pulp.LpProblem, stop: _Stop, solver: str) -> _Stop:
    """``stop``, or "no incumbent" when a node limit came first; an error when the solver claims
    to have finished without a plan."""
    if problem.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible) or stop.reason == "time limit":
        return stop
    if stop.reason == "node limit":
        return _Stop("no incumbent")
    raise SolverError(f"the {solver} solver returned no solution (status {pulp.LpStatus[problem.status]}, sol_status {problem.sol_status})")


# CBC's closing lines: "Result - Optimal solution found" / "Result - Stopped on node limit" /
# "Result - Stopped on time limit", then "Objective value: 2221.958", "Lower bound: 1936.326".
_RESULT = re.compile(r"^Result - (.*)$", re.MULTILINE)
_OBJECTIVE = re.compile(r"^Objective value:\s+(\S+)", re.MULTILINE)
_LOWER_BOUND = re.compile(r"^Lower bound:\s+(\S+)", re.MULTILINE)
_LP_OPTIMAL = re.compile(r"^Optimal - objective value", re.MULTILINE)


def _cbc_stop(log_text: str) -> _Stop:
    result = _RESULT.search(log_text)
    if result is None:  # an LP or an empty problem (one rank) ends with its simplex line; else CBC was stopped first
        return _Stop("optimal") if _LP_OPTIMAL.search(log_text) else _Stop("time limit", math.inf)
    if result.group(1).startswith("Optimal"):
        return _Stop("optimal")
    reason = "time limit" if "time" in result.group(1) else "node limit"
    objective, bound = _OBJECTIVE.search(log_text), _LOWER_BOUND.search(log_text)
    if objective is None or bound is None:
        return _Stop(reason, math.inf)
    return _Stop(reason, _relative_gap(float(objective.group(1)), float(bound.group(1))))


def _highs_stop(problem: pulp.LpProblem) -> _Stop:
    import highspy

    model = problem.solverModel
    status = model.getModelStatus()
    if status == highspy.HighsModelStatus.kOptimal:
        return _Stop("optimal")
    info = model.getInfo()
    reason = "time limit" if status == highspy.HighsModelStatus.kTimeLimit else "node limit"  # kSolutionLimit: mip_max_nodes
    return _Stop(reason, _relative_gap(info.objective_function_value, info.mip_dual_bound))


def _read_highs_incumbent(problem: pulp.LpProblem) -> None:
    import highspy

    model = problem.solverModel
    if model.getModelStatus() != highspy.HighsModelStatus.kSolutionLimit:
        raise SolverError(f"the highs solver stopped with status {model.getModelStatus()}, which PuLP cannot read")
    values = model.getSolution().col_value
    for variable in problem.variables():
        variable.varValue = values[variable.index]
    problem.assignStatus(pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible)


def _relative_gap(objective: float, bound: float) -> float:
    return max(0.0, objective - bound) / max(abs(objective), 1e-9)


# CBC's log lines with a new incumbent's objective ("Cbc0012I Integer solution of 6.2021878 found by
# feasibility pump ...", "Cbc0004I Integer solution of 6.2 found after 120 iterations ...") and with
# the search's progress ("Cbc0010I After 0 nodes, 1 on tree, 6.2021878 best solution, best possible
# 5.842724 (0.14 seconds)"); CBC writes 1e+50 as the best solution before it has one.
_INCUMBENT = re.compile(r"^Cbc00(?:04|12)I Integer solution of (\S+) found")
_SEARCH = re.compile(r"^Cbc0010I After \d+ nodes, \d+ on tree, (\S+) best solution, best possible (\S+)")
_NO_SOLUTION = 1e49


class _IncumbentTail:
    """While CBC runs, a thread reads its log as it grows and reports each better incumbent and
    lower bound, in seconds. CBC's output to a file is block-buffered, so news comes in bursts."""

    def __init__(self, log_path: str, on_incumbent: Callable[[float, float | None], None], *, poll_seconds: float = 0.2) -> None:
        self.log_path, self.on_incumbent, self.poll_seconds = log_path, on_incumbent, poll_seconds
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="autotp-cbc-log", daemon=True)
        self.best, self.bound = math.inf, -math.inf

    def __enter__(self) -> _IncumbentTail:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _follow(self) -> None:
        offset, partial = 0, ""
        while True:
            stopping = self.stop.is_set()  # read once more after CBC ends: the log is complete then
            try:
                with open(self.log_path, encoding="utf-8", errors="replace") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
            except FileNotFoundError:
                chunk = ""
            *lines, partial = (partial + chunk).split("\n")
            for line in lines:
                self._read(line.strip())
            if stopping:
                return
            self.stop.wait(self.poll_seconds)

    def _read(self, line: str) -> None:
        best, bound = self.best, self.bound
        if match := _INCUMBENT.match(line):
            best = min(best, float(match.group(1)))
        elif match := _SEARCH.match(line):
            if float(match.group(1)) < _NO_SOLUTION:
                best = min(best, float(match.group(1)))
            bound = max(bound, float(match.group(2)))
        news = best < self.best * (1 - 1e-9) or bound > self.bound
        self.best, self.bound = best, bound
        if news and best < math.inf:
            self.on_incumbent(best / _MICRO, bound / _MICRO if bound > -math.inf else None)


def _solve_with(problem: pulp.LpProblem, backend: pulp.LpSolver, solver: str) -> None:
    try:
        problem.solve(backend)
    except pulp.PulpSolverError as exc:
        raise SolverError(f"the {solver} solver failed: {exc}") from exc
    status = pulp.LpStatus[problem.status]
    if problem.status == pulp.LpStatusInfeasible:
        binding = [name for name in problem.constraints if name == "memory_budget" or name.startswith("pinned_")]
        raise InfeasiblePlanError(
            f"the ILP is infeasible ({status}) although the budget is above the state's floor; the constraints "
            f"that can bind: {', '.join(binding) or 'none of the budget or pins (a rule offers no consistent strategy)'}"
        )


def _chosen(variables: list) -> int:
    if len(variables) == 1:
        return 0
    values = [v.varValue or 0.0 for v in variables]
    return max(range(len(values)), key=values.__getitem__)
