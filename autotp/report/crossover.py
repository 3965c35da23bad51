"""Batch sizes at which the optimal plan changes.

    report = autotp.crossovers(model, example_inputs, mesh_shape=(4,), hardware="a100-pcie",
                               batch_range=(1, 4096))
    for c in report: print(c.batch, c.below.total_seconds, c.above.total_seconds)

The search:

1. Plan (the full ILP) at a geometric grid of batch sizes from ``batch_range[0]`` to
   ``batch_range[1]`` (``grid_factor`` apart, both ends included).
2. Fit every node's work as polynomials of B once (``autotp.cost.symbolic``), so any plan can be
   priced at any batch size without solving again.
3. Between neighbouring grid points whose plans differ, bisect on the integer batch size: plan
   at the midpoint, and keep the half whose ends still have different optimal plans (both
   halves when the midpoint's plan is a third one). Two plans are "the same" when their
   strategies are, or when each prices within ``rel_tol`` of the other at both ends (the ILP
   may break a tie either way, which is no crossover).
4. Each crossover reports the last batch size with the old plan (``below``), the first with
   the new one (``above``), and ``batch_exact``: where the two plans' cost expressions are
   equal, a real number between them.

The sequence length stays at the example's, so the work is fitted in B alone (the model is
captured at other batch sizes only): a graph that changes with the sequence length, such as a
``pos[:t]`` slice that is a no-op at the example's length, does not stop a batch search. Batch sizes are multiples of ``batch_multiple``
(default 1): at a batch size tp does not divide, batch-split strategies are not offered, so
with ``batch_multiple=1`` a crossover can mark a divisibility change rather than a change of
regime; pass ``batch_multiple=tp`` to compare only evenly splittable batches.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autotp.api import plan_model
from autotp.cost.model import CostModel, resolve_hardware
from autotp.cost.symbolic import CostTerm, WorkModel, cost_terms, fit_work, resize_inputs, terms_seconds
from autotp.errors import ConfigError
from autotp.ir.mesh import MeshSpec
from autotp.ir.plan import Plan
from autotp.ir.units import fmt_seconds
from autotp.report.table import n_collectives
from autotp.strategies.blocks import split_block_path
from autotp.strategies.engine import NodeKind

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, repr=False)
class Crossover:
    """The optimal plan is ``below`` up to ``batch_below`` and ``above`` from ``batch_above`` on."""

    batch_below: int
    batch_above: int
    batch_exact: float | None  # where below's and above's costs meet; None when they do not cross in between
    below: Plan
    above: Plan

    @property
    def batch(self) -> int:
        """The first batch size at which ``above`` is optimal."""
        return self.batch_above

    def changed_nodes(self) -> list[str]:
        """Nodes whose strategy differs between the two plans."""
        return [a.name for a, b in zip(self.below.nodes, self.above.nodes) if a.strategy != b.strategy]

    def changed_modules(self) -> list[str]:
        """Modules whose nodes change strategy, in graph order, a path repeated over blocks folded
        into one entry: ``blocks.0.mlp.c_fc`` ... ``blocks.11.mlp.c_fc`` -> ``blocks.*.mlp.c_fc ×12``."""
        blocks: dict[str, set[int]] = {}  # folded path -> the block indices it was seen in
        for a, b in zip(self.below.nodes, self.above.nodes):
            if a.strategy == b.strategy:
                continue
            path = a.module_path or ("(output)" if a.kind is NodeKind.OUTPUT else "(model)")
            block = split_block_path(path)
            if block is None:
                blocks.setdefault(path, set())
            else:
                blocks.setdefault(block.pattern, set()).add(block.index)
        out = []
        for path, indices in blocks.items():
            if len(indices) == 1:  # one block only: its real path
                group, _, rest = path.partition(".*")
                out.append(f"{group}.{next(iter(indices))}{rest}")
            else:
                out.append(f"{path} ×{len(indices)}" if indices else path)
        return out

    def __repr__(self) -> str:
        exact = "none" if self.batch_exact is None else f"{self.batch_exact:.2f}"
        return f"Crossover(batch {self.batch_below} -> {self.batch_above}, costs cross at {exact}, {len(self.changed_nodes())} nodes change strategy)"


@dataclass(frozen=True, slots=True, repr=False)
class CrossoverReport:
    """Every crossover found in the batch range, and the grid of plans it started from.

    ``str(report)`` (and ``summary()``) is a short table; ``repr`` one line.
    """

    crossovers: tuple[Crossover, ...]
    grid: tuple[tuple[int, Plan], ...]
    seq: int | None  # the example's sequence length, held over the search; None without a sequence dim

    def __iter__(self) -> Iterator[Crossover]:
        return iter(self.crossovers)

    def __len__(self) -> int:
        return len(self.crossovers)

    def __getitem__(self, k: int) -> Crossover:
        return self.crossovers[k]

    def summary(self) -> str:
        """Per crossover: the first batch of the new plan, where the costs cross, each plan's time
        on its side, then the modules that change strategy."""
        at_seq = f" at sequence length {self.seq}" if self.seq is not None else ""
        count = f"{len(self)} crossover{'s' if len(self) != 1 else ''}"
        lines = [f"optimal plans over batch sizes {self.grid[0][0]}..{self.grid[-1][0]}{at_seq}: {count}"]
        if not self.crossovers:
            plan = self.grid[0][1]
            lines.append(f"one plan is optimal over the whole range ({n_collectives(plan)} collectives at batch {self.grid[0][0]})")
            return "\n".join(lines)
        rows = [("batch", "costs cross at", "plan below", "plan above")]
        for c in self.crossovers:
            exact = f"{c.batch_exact:.2f}" if c.batch_exact is not None else f"- ({_divider(c.above)} now divides)"
            rows.append((str(c.batch_above), exact, _plan_cell(c.below, c.batch_below), _plan_cell(c.above, c.batch_above)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("")
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows[:1]]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows[1:]]
        lines.append("")
        for c in self.crossovers:
            lines.append(f"at batch {c.batch_above}, {len(c.changed_nodes())} nodes change strategy in: {', '.join(c.changed_modules())}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        batches = ", ".join(str(c.batch_above) for c in self.crossovers) or "none"
        return f"CrossoverReport(batch {self.grid[0][0]}..{self.grid[-1][0]}, seq {self.seq}: crossovers at {batches})"


def _divider(plan: Plan) -> str:
    """What must divide a split dim: ``tp`` on a 1-D mesh, ``the mesh (dp=2, tp=4)`` on an N-D one."""
    return "tp" if len(plan.mesh_shape) == 1 else f"the mesh {plan.mesh}"


def _plan_cell(plan: Plan, batch: int) -> str:
    return f"{fmt_seconds(plan.total_seconds)} at batch {batch}, {n_collectives(plan)} collectives"


def _grid(lo: int, hi: int, factor: float, multiple: int) -> list[int]:
    lo = math.ceil(lo / multiple) * multiple
    hi = (hi // multiple) * multiple
    if lo > hi:
        raise ConfigError(f"batch_range contains no multiple of batch_multiple={multiple}")
    points = {lo, hi}
    b = float(lo)
    while b < hi:
        b *= factor
        points.add(min(hi, max(lo, round(b / multiple) * multiple)))
    return sorted(points)


def _signature(plan: Plan) -> tuple[str, ...]:
    return tuple(str(n.strategy) for n in plan.nodes)


class _Search:
    """Plans and prices by batch size, with a cache (each plan is a capture and an ILP solve)."""

    def __init__(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...], *, work: WorkModel, cost: CostModel, plan_kwargs: dict, rel_tol: float) -> None:
        self.model, self.inputs, self.work, self.cost = model, example_inputs, work, cost
        self.plan_kwargs, self.rel_tol = plan_kwargs, rel_tol
        self.plans: dict[int, Plan] = {}
        self.terms: dict[tuple[str, ...], tuple[CostTerm, ...]] = {}

    def plan(self, batch: int) -> Plan:
        if batch not in self.plans:
            inputs = resize_inputs(self.inputs, batch=batch, seq=None)
            self.plans[batch] = plan_model(self.model, inputs, **self.plan_kwargs).plan
            log.info("crossovers: planned batch %d: %s", batch, fmt_seconds(self.plans[batch].total_seconds))
        return self.plans[batch]

    def seconds(self, plan: Plan, batch: float) -> float:
        key = _signature(plan)
        if key not in self.terms:
            self.terms[key] = cost_terms(plan, self.work, self.cost)
        return terms_seconds(self.terms[key], batch, self.work.seq0)

    def same(self, a: Plan, b: Plan, batches: Sequence[int]) -> bool:
        if _signature(a) == _signature(b):
            return True
        return all(math.isclose(self.seconds(a, x), self.seconds(b, x), rel_tol=self.rel_tol) for x in batches)

    def exact(self, below: Plan, above: Plan, lo: float, hi: float) -> float | None:
        """Where the two plans' costs meet in [lo, hi] (bisection on the real batch size)."""
        gap = lambda x: self.seconds(below, x) - self.seconds(above, x)  # noqa: E731 - <= 0 at lo, > 0 at hi
        if gap(lo) > 0 or gap(hi) <= 0:
            return None  # the new plan's strategies only became available (divisibility), no crossing
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if gap(mid) <= 0 else (lo, mid)
        return (lo + hi) / 2

    def between(self, lo: int, hi: int, multiple: int) -> list[Crossover]:
        """Crossovers in (lo, hi], where the plans at lo and hi differ."""
        below, above = self.plan(lo), self.plan(hi)
        if self.same(below, above, (lo, hi)):
            return []
        if hi - lo <= multiple:
            return [Crossover(lo, hi, self.exact(below, above, lo, hi), below, above)]
        mid = lo + (hi - lo) // (2 * multiple) * multiple
        return self.between(lo, mid, multiple) + self.between(mid, hi, multiple)


def crossovers(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    mesh_shape: Sequence[int],
    hardware: str = "h100-sxm",
    batch_range: tuple[int, int] = (1, 4096),
    memory_budget: int | str | None = None,
    training: bool = True,
    optimizer: str | None = "adamw",
    grid_factor: float = 2.0,
    batch_multiple: int = 1,
    seq_dim: int | None = 1,
    rel_tol: float = 1e-6,
) -> CrossoverReport:
    """The batch sizes in ``batch_range`` at which the optimal plan changes, with the plans on each side.

    The first dim of every example input is the batch; every other dim is held at the
    example's size. ``seq_dim`` only names the sequence dim for the report. The other arguments are :func:`autotp.plan`'s.
    """
    lo, hi = batch_range
    if not (isinstance(lo, int) and isinstance(hi, int)) or not 1 <= lo <= hi:
        raise ConfigError(f"batch_range must be two integers 1 <= lo <= hi, got {batch_range!r}")
    if grid_factor <= 1:
        raise ConfigError(f"grid_factor must be > 1, got {grid_factor}")
    if batch_multiple < 1:
        raise ConfigError(f"batch_multiple must be >= 1, got {batch_multiple}")
    profile = resolve_hardware(hardware)
    # without overlap: the symbolic cost the search compares plans by does not model it (autotp.cost.symbolic)
    plan_kwargs = dict(mesh_shape=mesh_shape, hardware=profile, memory_budget=memory_budget, training=training, optimizer=optimizer, overlap=False)
    cost = CostModel(profile, MeshSpec.of(mesh_shape), training=training, optimizer=optimizer if training else None, overlap=False)
    work = fit_work(model, example_inputs, seq_dim=None)  # T is held, so B alone; varying T could change the graph
    search = _Search(model, example_inputs, work=work, cost=cost, plan_kwargs=plan_kwargs, rel_tol=rel_tol)
    grid = _grid(lo, hi, grid_factor, batch_multiple)
    found: list[Crossover] = []
    for left, right in zip(grid, grid[1:]):
        found += search.between(left, right, batch_multiple)
    first = example_inputs[0]
    seq = int(first.shape[seq_dim]) if seq_dim is not None and first.ndim > seq_dim else None
    return CrossoverReport(tuple(found), tuple((b, search.plan(b)) for b in grid), seq)
