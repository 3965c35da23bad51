"""Reading a plan: its layout grouped by module, and what it buys over hand layouts.

``layout_sections`` groups the plan's ops by module and collapses identical repeated blocks
(``blocks.1-11 ×11``). ``price_baselines`` prices the layouts a user would otherwise write under
the same cost model: everything replicated, and Megatron-LM's column/row split of the linears
around each attention and MLP found in the graph (``layouts.megatron_layout_of``). A pinned
layout may not fit the memory budget, so baselines are priced without it and say so. ``format_table`` renders all of
it as text for ``autotp plan --format table``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from autotp.cost.model import CostModel
from autotp.errors import AutoTPError
from autotp.ir.placement import format_placements
from autotp.ir.plan import Conversion, NodePlan, Plan
from autotp.ir.units import fmt_nbytes, fmt_seconds
from autotp.solve.planner import megatron_plan, replicate_all
from autotp.strategies.blocks import split_block_path
from autotp.strategies.engine import NodeKind, StrategySpace

TOP_LEVEL = "top level"
MEGATRON = "Megatron-LM"


@dataclass(frozen=True, slots=True)
class Baseline:
    """A reference layout priced under the same cost model; ``plan`` is None when it does not apply."""

    name: str
    plan: Plan | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Row:
    """One op of the plan as the table shows it."""

    node: NodePlan
    module: str  # relative to its block in a block section

    @property
    def op(self) -> str:
        return short_op(self.node.op)

    @property
    def placements(self) -> str:
        return str(self.node.strategy)

    @property
    def collectives(self) -> str:
        return summarize_conversions(self.node.conversions) or "-"

    @property
    def seconds(self) -> float:
        return self.node.compute_seconds + self.node.comm_seconds

    def key(self) -> tuple[str, ...]:
        return (self.module, self.op, self.placements, self.collectives, fmt_seconds(self.seconds))


@dataclass(frozen=True, slots=True)
class Section:
    """Consecutive ops of one module, or of ``count`` identical blocks ``container.first..last``."""

    label: str
    rows: tuple[Row, ...]
    count: int = 1
    container: str = ""
    first: int | None = None

    @property
    def seconds(self) -> float:
        """Per block for a collapsed section."""
        return sum(r.seconds for r in self.rows)


def short_op(op: str) -> str:
    """``aten.linear.default`` -> ``linear``; ``aten.add.Tensor`` -> ``add``."""
    return op.removeprefix("aten.").split(".")[0]


def summarize_conversions(conversions: Iterable[Conversion]) -> str:
    """One entry per kind and direction, bytes summed: ``all_reduce P->R 24.00 MiB, grad_all_reduce ×2 2.25 MiB (backward)``."""
    groups: dict[tuple[str, str], list[Conversion]] = {}
    for c in conversions:
        key = (c.sync_kind, _grad_sync_note(c)) if c.backward_only else (c.kind, f" {_direction(c)}")
        groups.setdefault(key, []).append(c)
    parts = []
    for (kind, how), cs in groups.items():
        times = f" ×{len(cs)}" if len(cs) > 1 else ""
        total = fmt_nbytes(sum(c.nbytes for c in cs))
        parts.append(f"{kind}{times} {total}{how}" if how.startswith(" (") else f"{kind}{times}{how} {total}")
    return ", ".join(parts)


def format_conversion(c: Conversion) -> str:
    if c.backward_only:
        return f"{c.sync_kind} {fmt_nbytes(c.nbytes)}{_grad_sync_note(c)}"
    return f"{c.kind} {_direction(c)} {fmt_nbytes(c.nbytes)}"


def _direction(c: Conversion) -> str:
    """``S(0)->R`` on a 1-D mesh, ``(S(0), S(1))->(S(0), R)`` on an N-D one."""
    return f"{format_placements(c.src)}->{format_placements(c.dst)}"


def _grad_sync_note(c: Conversion) -> str:
    """A gradient sync the plan prices runs in backward; one it does not, only if a gradient reaches it."""
    return " (backward)" if c.priced else " (backward, only if a gradient flows)"


def shown(node: NodePlan) -> bool:
    """Ops, and the output when it converts; views without a conversion are bookkeeping."""
    if node.kind is NodeKind.OUTPUT:
        return bool(node.conversions)
    if node.kind is not NodeKind.OP:
        return False
    return bool(node.conversions) or node.compute_seconds > 0


def layout_sections(plan: Plan) -> list[Section]:
    """The plan's shown ops grouped by module (graph order), identical repeated blocks collapsed."""
    order: list[tuple] = []
    rows: dict[tuple, list[Row]] = {}
    for node in plan.nodes:
        if not shown(node):
            continue
        block = split_block_path(node.module_path)
        if block is not None:
            key: tuple = ("block", block.group, block.index)
            row = Row(node, block.within or "(block)")
        else:  # consecutive ops outside any block share one section
            key = ("top", len(order) if not order or order[-1][0] != "top" else order[-1][1])
            row = Row(node, "(output)" if node.kind is NodeKind.OUTPUT else node.module_path or "(model)")
        if key not in rows:
            order.append(key)
            rows[key] = []
        rows[key].append(row)
    sections: list[Section] = []
    for key in order:
        if key[0] == "block":
            _, container, index = key
            section_rows = tuple(rows[key])
            last = sections[-1] if sections else None
            if (
                last is not None and last.container == container and last.first is not None
                and last.first + last.count == index and [r.key() for r in last.rows] == [r.key() for r in section_rows]
            ):
                sections[-1] = Section(_block_label(container, last.first, last.count + 1), last.rows, last.count + 1, container, last.first)
            else:
                sections.append(Section(_block_label(container, index, 1), section_rows, 1, container, index))
        else:
            sections.append(Section(TOP_LEVEL, tuple(rows[key])))
    return sections


def _block_label(container: str, first: int, count: int) -> str:
    return f"{container}.{first}" if count == 1 else f"{container}.{first}-{first + count - 1} ×{count}"


# ----------------------------------------------------------------------------------------------
# baselines


def price_baselines(space: StrategySpace, cost: CostModel, *, hardware: str, memory_budget: int | None) -> list[Baseline]:
    """Replicate-all and Megatron-LM, each priced without the budget (the note says when it is over)."""
    baselines = [_with_budget_note(Baseline("replicate-all", replicate_all(space, cost, hardware=hardware)), memory_budget)]
    try:
        baselines.append(_with_budget_note(Baseline(MEGATRON, *megatron_plan(space, cost, hardware=hardware)), memory_budget))
    except AutoTPError as exc:  # a pinned split the model's shapes do not allow
        baselines.append(Baseline(MEGATRON, None, f"not priced: {exc}"))
    return baselines


def _with_budget_note(baseline: Baseline, memory_budget: int | None) -> Baseline:
    plan = baseline.plan
    if plan is None or memory_budget is None or plan.memory_nbytes_per_device <= memory_budget:
        return baseline
    over = f"needs {fmt_nbytes(plan.memory_nbytes_per_device)} per device, over the {fmt_nbytes(memory_budget)} budget: priced without it"
    return Baseline(baseline.name, plan, f"{baseline.note}; {over}" if baseline.note else over)


# ----------------------------------------------------------------------------------------------
# text


def mode_text(plan: Plan) -> str:
    if plan.training:
        return f"training ({plan.optimizer or 'no optimizer'}): forward + backward"
    return "inference: forward only"


def n_collectives(plan: Plan) -> int:
    return len(plan.collectives(backward=True))


def totals_rows(plan: Plan, baselines: Sequence[Baseline]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the totals table: this plan next to each baseline."""
    plans = [plan] + [b.plan for b in baselines]
    header = ["", "this plan"] + [b.name for b in baselines]

    def cells(fn) -> list[str]:
        return [fn(p) if p is not None else "n/a" for p in plans]

    rows = [
        ["compute"] + cells(lambda p: fmt_seconds(p.compute_seconds)),
        ["communication"] + cells(lambda p: fmt_seconds(p.comm_seconds)),
        *([["(hidden behind compute)"] + cells(lambda p: fmt_seconds(p.hidden_seconds))] if any(p is not None and p.hidden_seconds for p in plans) else []),
        ["total"] + cells(lambda p: fmt_seconds(p.total_seconds)),
        ["collectives"] + cells(lambda p: str(n_collectives(p))),
        ["sent per rank"] + cells(lambda p: fmt_nbytes(p.comm_bytes_per_rank)),
        ["memory per device"] + cells(lambda p: fmt_nbytes(p.memory_nbytes_per_device)),
    ]
    return header, rows


def speedup_lines(plan: Plan, baselines: Sequence[Baseline]) -> list[str]:
    lines = []
    for b in baselines:
        if b.plan is not None and plan.total_seconds > 0:
            ratio = b.plan.total_seconds / plan.total_seconds
            lines.append(f"{b.name}: {fmt_seconds(b.plan.total_seconds)}, {ratio:.2f}x this plan's estimated time" + (f" ({b.note})" if b.note else ""))
        elif b.note:
            lines.append(f"{b.name}: {b.note}")
    return lines


def format_table(plan: Plan, baselines: Sequence[Baseline] = (), *, title: str = "") -> str:
    """The ``--format table`` text: the layout by module, then the totals against the baselines."""
    header = ("module", "op", "placements", "collective", "est. time")
    body: list[tuple[str, ...] | str] = []
    for section in layout_sections(plan):
        per = f"  ({fmt_seconds(section.seconds)} per block)" if section.count > 1 else ""
        if section.label != TOP_LEVEL or body:
            body.append(f"{section.label}{per}" if section.label != TOP_LEVEL else "")
        for row in section.rows:
            body.append(("  " + row.module, row.op, row.placements, row.collectives, fmt_seconds(row.seconds)))
    cells = [header] + [r for r in body if isinstance(r, tuple)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    lines = [title] if title else []
    lines += [
        f"mesh {plan.mesh_text()} on {plan.hardware}, {mode_text(plan)}; solver {plan.solver_status} in {plan.solve_seconds:.2f}s"
        + (f"; memory budget {fmt_nbytes(plan.memory_budget)} per device" if plan.memory_budget is not None else ""),
        "",
        line(header),
        line(["-" * w for w in widths]),
    ]
    lines += [line(r) if isinstance(r, tuple) else r for r in body]
    t_header, t_rows = totals_rows(plan, baselines)
    t_widths = [max(len(r[i]) for r in [t_header] + t_rows) for i in range(len(t_header))]
    lines += ["", "totals (per step, per device)"]
    lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(t_header, t_widths))).rstrip())
    for r in t_rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, t_widths))).rstrip())
    notes = speedup_lines(plan, baselines)
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def iter_rows(sections: Iterable[Section]) -> Iterable[tuple[Section, Row]]:
    for section in sections:
        for row in section.rows:
            yield section, row
