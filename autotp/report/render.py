"""Pictures of a plan: Graphviz source (``to_dot``) and one self-contained HTML page (``to_html``).

Both colour a value by its placement (R grey, S(d) one hue per dim, P orange; on an N-D mesh,
by the first axis that splits it, else partial, else grey) and mark every collective in red. The HTML page draws the per-layer layout of ``report.layout_sections`` as
inline SVG, with the totals against the baselines; it loads nothing from the network.
"""
from __future__ import annotations

import html
from collections.abc import Sequence

from autotp.ir.placement import Partial, Placement, Placements, Shard, format_placements
from autotp.ir.plan import NodePlan, Plan
from autotp.ir.units import fmt_nbytes, fmt_seconds
from autotp.ir.values import format_value
from autotp.report.table import (
    Baseline,
    Row,
    Section,
    format_conversion,
    layout_sections,
    mode_text,
    speedup_lines,
    totals_rows,
)
from autotp.strategies.engine import NodeKind

_SHARD_COLOURS = ("#4c78a8", "#54a24b", "#b279a2", "#72b7b2", "#9d755d", "#eeca3b")
_REPLICATE_COLOUR = "#bab0ac"
_PARTIAL_COLOUR = "#f58518"
_COLLECTIVE_COLOUR = "#d62728"


def placement_colour(p: Placement | Placements) -> str:
    """One placement's colour; placements over several mesh axes take the first split's, else
    partial's, else replicated's."""
    if isinstance(p, tuple):
        p = next((x for x in p if isinstance(x, Shard)), next((x for x in p if isinstance(x, Partial)), p[0]))
    if isinstance(p, Shard):
        return _SHARD_COLOURS[p.dim % len(_SHARD_COLOURS)]
    if isinstance(p, Partial):
        return _PARTIAL_COLOUR
    return _REPLICATE_COLOUR


def _out(node: NodePlan) -> Placements:
    """The placements of the node's (first) output."""
    return node.strategy.outputs[0]


# ----------------------------------------------------------------------------------------------
# Graphviz


def to_dot(plan: Plan, *, title: str = "") -> str:
    """The op graph (parameters folded into their consumers), clustered by block, coloured by placement."""
    lines = [
        "digraph autotp_plan {",
        f"  label={_dot_str(title or 'autotp plan')}; labelloc=t; fontname=Helvetica;",
        "  rankdir=TB; node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];",
        "  edge [fontname=Helvetica, fontsize=9, color=\"#888888\"];",
    ]
    shown = {n.name: n for n in plan.nodes if n.kind is not NodeKind.STATE}
    clusters: dict[str, list[NodePlan]] = {}
    for node in shown.values():
        parts = node.module_path.split(".")
        key = ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else ""
        clusters.setdefault(key, []).append(node)
    for k, (key, nodes) in enumerate(clusters.items()):
        indent = "  "
        if key:
            lines.append(f"  subgraph cluster_{k} {{ label={_dot_str(key)}; style=dashed; color=\"#999999\";")
            indent = "    "
        for node in nodes:
            label = f"{node.name}\\n{node.op.removeprefix('aten.')}\\n{node.strategy}"
            tooltip = f"{node.module_path or '(model)'}: {format_value(node.output_meta)}; {fmt_seconds(node.compute_seconds + node.comm_seconds)}"
            lines.append(f"{indent}{_dot_id(node.name)} [label={_dot_str(label)}, fillcolor=\"{placement_colour(_out(node))}\", tooltip={_dot_str(tooltip)}];")
        if key:
            lines.append("  }")
    for node in shown.values():
        converted = {c.value: c for c in node.conversions if c.in_forward}
        for ref in node.inputs:
            producer = ref.node
            if producer not in shown:
                continue
            c = converted.get(ref)
            if c is not None and c.is_collective:
                attrs = f"color=\"{_COLLECTIVE_COLOUR}\", penwidth=2, fontcolor=\"{_COLLECTIVE_COLOUR}\", label={_dot_str(format_conversion(c))}"
            elif c is not None:
                attrs = f"style=dashed, label={_dot_str(format_conversion(c))}"
            else:
                attrs = ""
            lines.append(f"  {_dot_id(producer)} -> {_dot_id(node.name)}" + (f" [{attrs}]" if attrs else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_id(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n") + '"'


# ----------------------------------------------------------------------------------------------
# HTML

_BOX_W, _BOX_H, _GAP, _ROW_GAP, _PAD = 168, 62, 26, 34, 12
_MAX_W = 1320

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px 32px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
.sub { color: #555; margin: 0 0 18px 0; font-size: 14px; }
h2 { font-size: 17px; margin: 22px 0 8px 0; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 12px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
#totals th { background: #f4f4f4; }
#totals td.best { font-weight: 600; color: #116611; }
.notes { font-size: 13px; color: #333; margin: 8px 0 14px 0; padding-left: 18px; }
#legend { display: flex; flex-wrap: wrap; gap: 14px; font-size: 13px; align-items: center; margin: 14px 0 4px 0; }
.chip { display: inline-block; width: 14px; height: 14px; border-radius: 3px; vertical-align: -2px; margin-right: 5px; }
.layer { margin: 14px 0 6px 0; }
.layer h3 { font-size: 14px; margin: 0 0 4px 0; font-family: Menlo, Consolas, monospace; }
.layer h3 .count { color: #fff; background: #444; border-radius: 9px; padding: 0 7px; font-size: 12px; margin-left: 6px; }
.layer h3 .time { color: #666; font-weight: normal; margin-left: 8px; font-family: -apple-system, Helvetica, sans-serif; font-size: 12px; }
svg text { font-family: Menlo, Consolas, monospace; }
details { margin-top: 18px; }
#ops td { font-family: Menlo, Consolas, monospace; font-size: 12px; text-align: left; }
"""


def to_html(plan: Plan, baselines: Sequence[Baseline] = (), *, title: str = "") -> str:
    """One page: header, totals against the baselines, legend, per-layer layout (SVG), op table."""
    sections = layout_sections(plan)
    budget = f"; memory budget {fmt_nbytes(plan.memory_budget)} per device" if plan.memory_budget is not None else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title or 'autotp plan')}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1 id="title">{html.escape(title or "autotp plan")}</h1>',
        (
            f'<p class="sub">mesh {html.escape(plan.mesh_text())} on <b>{html.escape(plan.hardware)}</b>, {html.escape(mode_text(plan))}; '
            f"solver {html.escape(plan.solver_status)} in {plan.solve_seconds:.2f}s{html.escape(budget)}</p>"
        ),
        _totals_html(plan, baselines),
        _legend_html(plan),
        '<h2>Layout by layer</h2><div id="layout">',
    ]
    parts += [_section_html(k, s) for k, s in enumerate(sections)]
    parts.append("</div>")
    parts.append(_ops_table_html(sections))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _totals_html(plan: Plan, baselines: Sequence[Baseline]) -> str:
    header, rows = totals_rows(plan, baselines)
    out = ['<h2>Totals per step, per device</h2><table id="totals"><tr>']
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>" + "".join(
            f'<td class="{"best" if k == 1 and row[0] == "total" else ""}">{html.escape(c)}</td>' for k, c in enumerate(row)
        ) + "</tr>")
    out.append("</table>")
    notes = speedup_lines(plan, baselines)
    if notes:
        out.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(out)


def _legend_html(plan: Plan) -> str:
    dims = sorted({p.dim for n in plan.nodes for ps in (*n.strategy.inputs, _out(n)) for p in ps if isinstance(p, Shard)})
    items = [(_REPLICATE_COLOUR, "R: replicated")] + [(placement_colour(Shard(d)), f"S({d}): split on dim {d}") for d in dims]
    items += [(_PARTIAL_COLOUR, "P: partial sum"), (_COLLECTIVE_COLOUR, "collective")]
    chips = "".join(f'<span><span class="chip" style="background:{c}"></span>{html.escape(t)}</span>' for c, t in items)
    return (
        f'<div id="legend">{chips}<span style="color:#555">box: one op, coloured by its output; '
        "chips: the placements of its inputs; red badge: the collective run before it</span></div>"
    )


def _section_html(index: int, section: Section) -> str:
    per = "per block" if section.count > 1 else ""
    count = f'<span class="count">×{section.count}</span>' if section.count > 1 else ""
    label = section.label.split(" ×")[0]
    head = (
        f'<div class="layer" id="layer-{index}"><h3>{html.escape(label)}{count}'
        f'<span class="time">{fmt_seconds(section.seconds)} {per}</span></h3>'
    )
    return head + _section_svg(section.rows) + "</div>"


def _section_svg(rows: Sequence[Row]) -> str:
    per_line = max(1, (_MAX_W - _PAD) // (_BOX_W + _GAP))
    n_lines = (len(rows) + per_line - 1) // per_line
    width = _PAD * 2 + min(len(rows), per_line) * (_BOX_W + _GAP)
    height = n_lines * (_BOX_H + _ROW_GAP) + _PAD
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for k, row in enumerate(rows):
        x = _PAD + (k % per_line) * (_BOX_W + _GAP) + _GAP
        y = _PAD + (k // per_line) * (_BOX_H + _ROW_GAP) + 14
        out.append(_op_svg(row, x, y))
    out.append("</svg>")
    return "".join(out)


def _op_svg(row: Row, x: int, y: int) -> str:
    node = row.node
    fill = placement_colour(_out(node))
    tip = (
        f"{node.name} ({node.op}) in {node.module_path or '(model)'}\n{node.strategy}\nvalue {format_value(node.output_meta)}\n"
        f"compute {fmt_seconds(node.compute_seconds)}, communication {fmt_seconds(node.comm_seconds)}"
        + "".join(f"\n{format_conversion(c)} ({fmt_seconds(c.seconds)})" for c in node.conversions)
    )
    parts = [f'<g class="op" data-node="{html.escape(node.name)}" data-placement="{html.escape(format_placements(_out(node)))}">']
    parts.append(f"<title>{html.escape(tip)}</title>")
    parts.append(f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="6" fill="#ffffff" stroke="{fill}" stroke-width="2"/>')
    parts.append(f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="20" rx="6" fill="{fill}"/>')
    parts.append(f'<text x="{x + 6}" y="{y + 14}" font-size="11" fill="#fff" font-weight="bold">{html.escape(_clip(row.op, 17))} → {html.escape(format_placements(_out(node)))}</text>')
    parts.append(f'<text x="{x + 6}" y="{y + 34}" font-size="10" fill="#333">{html.escape(_clip(row.module, 24))}</text>')
    parts.append(f'<text x="{x + 6}" y="{y + 54}" font-size="9" fill="#666">{html.escape(fmt_seconds(row.seconds))}</text>')
    cx = x + _BOX_W - 6
    for p in reversed(node.strategy.inputs):
        label = format_placements(p)
        w = 8 + 6 * len(label)
        cx -= w + 3
        parts.append(f'<rect x="{cx}" y="{y + 43}" width="{w}" height="14" rx="3" fill="{placement_colour(p)}"/>')
        parts.append(f'<text x="{cx + 4}" y="{y + 54}" font-size="9" fill="#fff">{html.escape(label)}</text>')
    collectives = [c for c in node.conversions if c.is_collective]
    if collectives:
        c = collectives[0]
        more = f" +{len(collectives) - 1}" if len(collectives) > 1 else ""
        text = f"{c.kind if not c.backward_only else c.sync_kind} {fmt_nbytes(c.nbytes)}{more}"
        bw = 6 + 5.6 * len(text)
        parts.append(f'<g class="collective" data-kind="{html.escape(c.kind)}">')
        parts.append(f'<rect x="{x - 4}" y="{y - 15}" width="{bw:.0f}" height="14" rx="7" fill="{_COLLECTIVE_COLOUR}"/>')
        parts.append(f'<text x="{x + 2}" y="{y - 4}" font-size="9" fill="#fff">{html.escape(text)}</text></g>')
    parts.append("</g>")
    return "".join(parts)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _ops_table_html(sections: Sequence[Section]) -> str:
    out = [
        '<details><summary>All ops as a table</summary><table id="ops">',
        "<tr><th>block</th><th>module</th><th>op</th><th>placements</th><th>collective</th><th>est. time</th></tr>",
    ]
    for section in sections:
        for row in section.rows:
            cells = (section.label, row.module, row.op, row.placements, row.collectives, fmt_seconds(row.seconds))
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</table></details>")
    return "\n".join(out)

