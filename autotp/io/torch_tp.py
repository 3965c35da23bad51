"""Hand a plan over to PyTorch: the ``parallelize_module`` plan that runs the same layout, or a refusal.

PyTorch's tensor-parallel API shards whole modules with three styles (``torch.distributed.tensor.parallel``):

    ColwiseParallel   linear weight S(0) (embedding: S(1)); input R; output split on features
    RowwiseParallel   linear weight S(1); input split on features; output a partial sum, reduced
                      to R (all-reduce) or S(d) (reduce-scatter) as ``output_layouts`` says
    SequenceParallel  a norm or dropout run on a sequence-split (S(1)) activation

Between styled modules the model's Python runs on plain rank-local tensors, and every rank is
called with the full inputs. An autotp plan is expressible in these styles when every split
parameter belongs to a styled ``nn.Linear`` / ``nn.Embedding``, and every conversion happens at a
styled module's input (``input_layouts``) or output (``output_layouts``).

Expressible is not enough: the model's own code must also compute rank-local sizes.
``view(B, T, self.n_head, head_dim)`` with the global head count fails on a column-split
projection, and ``view(B, T, n_head, -1)`` runs but mixes heads. ``export_torch_tp`` therefore
captures the model as one rank runs it under the styles (``autotp.io.torch_tp_check``: meta tensors,
rank-local parameter shapes) and compares every op outside the styles with the plan's
rank-local shapes. A plan that is not expressible, or a model whose code does not follow, is
refused with a :class:`~autotp.errors.TorchTPExportError` naming the module and what to do;
nothing is written that would run differently from the plan.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from autotp.errors import ConfigError
from autotp.ir.placement import Partial, Placement, R, Replicate, Shard, parse_placement
from autotp.ir.plan import NodePlan, Plan
from autotp.ir.strategy import OpStrategy
from autotp.ir.values import ValueRef, output_metas
from autotp.strategies.blocks import split_block_path
from autotp.strategies.engine import NodeKind

FORMAT = "autotp.torch_tp"
SCHEMA_VERSION = 2  # 2: a file is written only for a plan the styles run as planned (no not_expressible, no notes)

_LINEAR = ("aten.linear",)
_EMBEDDING = ("aten.embedding",)


@dataclass(frozen=True, slots=True)
class Style:
    """One module's style: ``ColwiseParallel``, ``RowwiseParallel`` or ``SequenceParallel``."""

    style: str
    input_layouts: Placement | None = None
    output_layouts: Placement | None = None
    sequence_dim: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"style": self.style}
        if self.input_layouts is not None:
            out["input_layouts"] = str(self.input_layouts)
        if self.output_layouts is not None:
            out["output_layouts"] = str(self.output_layouts)
        if self.sequence_dim is not None:
            out["sequence_dim"] = self.sequence_dim
        return out


@dataclass(frozen=True, slots=True)
class TorchTPPlan:
    """Module path (``fnmatch`` patterns allowed) -> style, and what could not be expressed
    (``{"module", "node", "why"}`` each; an exported plan has none)."""

    tp_size: int
    styles: dict[str, Style]
    not_expressible: tuple[dict[str, str], ...] = ()

    @property
    def complete(self) -> bool:
        return not self.not_expressible

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": SCHEMA_VERSION,
            "tp_size": self.tp_size,
            "plan": {path: style.to_dict() for path, style in self.styles.items()},
        }


class _Graph:
    """The plan as a graph: producers, consumers and the placement each consumer reads."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.nodes = {n.name: n for n in plan.nodes}
        self.readers: dict[ValueRef, list[tuple[NodePlan, int]]] = defaultdict(list)
        for node in plan.nodes:
            for slot, ref in enumerate(node.inputs):
                self.readers[ref].append((node, slot))

    def produced(self, ref: ValueRef) -> Placement:
        return _strategy(self.nodes[ref.node]).outputs()[ref.index or 0]

    def reads(self, ref: ValueRef) -> set[Placement]:
        return {_strategy(node).inputs[slot] for node, slot in self.readers[ref]}


def _strategy(node: NodePlan) -> OpStrategy:
    """A node's strategy on the plan's one mesh axis (``torch_tp_plan`` refuses N-D plans)."""
    return node.strategy.axis(0)


def torch_tp_plan(plan: Plan) -> TorchTPPlan:
    """The ``parallelize_module`` plan equivalent to ``plan``, as far as the styles reach.

    ``ConfigError`` on a plan for an N-D mesh: the styles shard over one 1-D mesh.
    """
    if len(plan.mesh_shape) != 1:
        raise ConfigError(
            f"cannot export a plan for the {len(plan.mesh_shape)}-D mesh {plan.mesh_text()} as a parallelize_module plan: "
            "ColwiseParallel/RowwiseParallel/SequenceParallel shard over a 1-D mesh only. What to do: run this plan with "
            "autotp.parallelize (or save it with --format json), or plan for a 1-D mesh (--mesh N) to export it"
        )
    graph = _Graph(plan)
    styles: dict[str, Style] = {}
    styled_nodes: dict[str, str] = {}  # op node -> module path
    problems: list[dict[str, str]] = []
    effective: dict[ValueRef, Placement] = {}  # value -> placement the code after its module sees

    ops_by_module: dict[str, list[NodePlan]] = defaultdict(list)
    for node in plan.nodes:
        if node.kind is NodeKind.OP and node.module_path:
            ops_by_module[node.module_path].append(node)

    for module, ops in ops_by_module.items():
        main = [n for n in ops if n.op.startswith(_LINEAR + _EMBEDDING)]
        if len(main) == 1 and len(ops) == 1:
            style, why = _linear_style(main[0], graph)
            if style is not None:
                styles[module] = style
                styled_nodes[main[0].name] = module
                effective[ValueRef(main[0].name)] = style.output_layouts  # type: ignore[assignment]
            elif why:
                problems.append({"module": module, "node": main[0].name, "why": why})
        elif not main and _is_leaf(module, ops_by_module) and _sequence_parallel(ops, graph):
            styles[module] = Style("SequenceParallel", sequence_dim=1)
            for n in ops:
                styled_nodes[n.name] = module

    _fill_inputs(styles, styled_nodes, graph, effective)
    problems += _check_unstyled(plan, graph, styled_nodes, effective)
    problems += _check_state(plan, graph, styled_nodes)
    return TorchTPPlan(plan.tp_size, _collapse(styles, plan), tuple(problems))


def _linear_style(node: NodePlan, graph: _Graph) -> tuple[Style | None, str]:
    """The style of one linear/embedding node, or (None, why) when it has none (None, "") if replicated."""
    s = _strategy(node)
    out = s.output
    if all(p == R for p in (*s.inputs, *s.outputs())):
        return None, ""
    last = output_metas(node.output_meta)[0].ndim - 1
    reads = graph.reads(ValueRef(node.name))
    is_embedding = node.op.startswith(_EMBEDDING)
    weight = s.inputs[0] if is_embedding else s.inputs[1]
    data = s.inputs[1] if is_embedding else s.inputs[0]
    if len(reads) != 1:
        return None, f"its output is read as {', '.join(sorted(map(str, reads)))} by different consumers; a style has one output layout"
    (read,) = reads
    if isinstance(read, Partial):
        return None, "its partial-sum output is consumed unreduced; RowwiseParallel always reduces"
    column_weight = Shard(1) if is_embedding else Shard(0)
    if weight == column_weight and out == Shard(last) and data == R:
        return Style("ColwiseParallel", input_layouts=None, output_layouts=read), ""
    if not is_embedding and weight == Shard(1) and data == Shard(last) and out == Partial():
        return Style("RowwiseParallel", input_layouts=None, output_layouts=read), ""
    if is_embedding and weight == Shard(0) and data == R and out == Partial():  # vocab-parallel lookup
        return Style("RowwiseParallel", input_layouts=None, output_layouts=read), ""
    return None, f"{node.op} {s} is neither column- nor row-parallel (a batch or sequence split, or a split weight gathered)"


def _is_leaf(module: str, ops_by_module: dict[str, list[NodePlan]]) -> bool:
    """A style on a module applies to its whole subtree: SequenceParallel only goes on leaves
    (a norm, a dropout), never on a block whose own ops are its residual adds."""
    return not any(other.startswith(module + ".") for other in ops_by_module)


def _sequence_parallel(ops: list[NodePlan], graph: _Graph) -> bool:
    """A module all of whose ops run on S(1) activations with replicated parameters (norms, dropout)."""
    compute = [n for n in ops if n.compute_seconds > 0 or n.conversions]
    if not compute:
        return False
    for node in ops:
        for slot, ref in enumerate(node.inputs):
            producer = graph.nodes[ref.node]
            want = R if producer.kind is NodeKind.STATE else Shard(1)
            if _strategy(node).inputs[slot] != want:
                return False
        if any(p != Shard(1) for p in _strategy(node).outputs()):
            return False
    return True


def _fill_inputs(styles: dict[str, Style], styled_nodes: dict[str, str], graph: _Graph, effective: dict[ValueRef, Placement]) -> None:
    """``input_layouts`` of each linear style: how its input arrives from the code before it."""
    for name, module in styled_nodes.items():
        style = styles[module]
        if style.style == "SequenceParallel":
            continue
        node = graph.nodes[name]
        ref = node.inputs[1] if node.op.startswith(_EMBEDDING) else node.inputs[0]
        arriving = effective.get(ref, graph.produced(ref))
        styles[module] = Style(style.style, arriving, style.output_layouts)


def _check_unstyled(plan: Plan, graph: _Graph, styled_nodes: dict[str, str], effective: dict[ValueRef, Placement]) -> list[dict[str, str]]:
    """Conversions outside linear styles have no style to run them; a SequenceParallel module
    must receive its activations already split on the sequence dim."""
    problems: list[dict[str, str]] = []
    for node in plan.nodes:
        if node.kind not in (NodeKind.OP, NodeKind.OUTPUT):
            continue
        if node.name in styled_nodes and node.op.startswith(_LINEAR + _EMBEDDING):
            continue  # the style converts its input (input_layouts -> what it computes on)
        for slot, ref in enumerate(node.inputs):
            producer_name = ref.node
            if styled_nodes.get(producer_name) is not None and graph.nodes[producer_name].op.startswith(_LINEAR + _EMBEDDING):
                arriving = effective[ref]
            else:
                arriving = graph.produced(ref)
                if producer_name in styled_nodes:  # SequenceParallel keeps the shards
                    arriving = Shard(1)
            wanted = _strategy(node).inputs[slot]
            if arriving != wanted:
                where = "the model output" if node.kind is NodeKind.OUTPUT else f"{node.op} in '{node.module_path or '(model)'}'"
                problems.append({
                    "module": node.module_path, "node": node.name,
                    "why": f"{where} needs {ref} converted {arriving} -> {wanted}, outside any module style",
                })
    return problems


def _check_state(plan: Plan, graph: _Graph, styled_nodes: dict[str, str]) -> list[dict[str, str]]:
    """Every split parameter must be split by the one style of the one module that owns it."""
    problems = []
    for node in plan.nodes:
        if node.kind is not NodeKind.STATE or not isinstance(_strategy(node).output, Shard):
            continue
        owners = {styled_nodes.get(c.name) for c, _ in graph.readers[ValueRef(node.name)]}
        if None in owners:
            ops = ", ".join(sorted({c.op for c, _ in graph.readers[ValueRef(node.name)] if c.name not in styled_nodes}))
            problems.append({
                "module": node.module_path, "node": node.name,
                "why": f"parameter {node.name} is split {_strategy(node).output} but read by {ops} outside a styled module "
                "(styles shard nn.Linear (aten.linear) and nn.Embedding (aten.embedding) modules only)",
            })
        elif len(owners) > 1:
            problems.append({"module": node.module_path, "node": node.name, "why": f"parameter {node.name} is shared by modules {', '.join(sorted(owners))} (tied weights); each style would shard it again"})  # type: ignore[arg-type]  # no None: handled above
    return problems


def _collapse(styles: dict[str, Style], plan: Plan) -> dict[str, Style]:
    """``blocks.0.mlp.c_fc`` ... ``blocks.11.mlp.c_fc`` with one style -> ``blocks.*.mlp.c_fc``."""
    indices: dict[str, set[int]] = defaultdict(set)
    for node in plan.nodes:
        block = split_block_path(node.module_path)
        if block:
            indices[block.group].add(block.index)
    groups: dict[str, dict[int, Style]] = defaultdict(dict)  # by pattern: blocks.*.mlp.c_fc
    for path, style in styles.items():
        block = split_block_path(path)
        if block and block.within:
            groups[block.pattern][block.index] = style
    out: dict[str, Style] = {}
    for path, style in styles.items():
        block = split_block_path(path)
        if block and block.within:
            members = groups[block.pattern]
            if set(members) == indices[block.group] and len(set(members.values())) == 1 and len(members) > 1:
                out[block.pattern] = style
                continue
        out[path] = style
    return out


# ----------------------------------------------------------------------------------------------
# refusing what the styles cannot run


WHAT_TO_DO = (
    "run this plan with autotp.parallelize (or save it with --format json and load it with "
    "autotp.Plan.load), which inserts every conversion itself; or make a plan whose splits sit "
    "on linears in column/row pairs (autotp.solve.ilp.solve(space, cost, pinned=autotp.solve.layouts.megatron_pins(space)))"
)


def to_parallelize_plan(data: dict[str, Any]) -> dict[str, Any]:
    """The ``parallelize_module`` plan (style objects) from the JSON ``--format torch-tp`` writes."""
    from torch.distributed.tensor import Partial as TPartial
    from torch.distributed.tensor import Replicate as TReplicate
    from torch.distributed.tensor import Shard as TShard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
    )

    from autotp.errors import PlanFormatError

    if data.get("format") != FORMAT or data.get("version") != SCHEMA_VERSION:
        raise PlanFormatError(
            f"not a version-{SCHEMA_VERSION} {FORMAT} file (format {data.get('format')!r}, version {data.get('version')!r}); "
            "a version-1 file may hold a partial plan that runs differently from the autotp plan: "
            "export it again with autotp plan --format torch-tp"
        )

    def layout(text: str | None) -> Any:
        if text is None:
            return None
        p = parse_placement(text)
        return TShard(p.dim) if isinstance(p, Shard) else TReplicate() if isinstance(p, Replicate) else TPartial()

    classes = {"ColwiseParallel": ColwiseParallel, "RowwiseParallel": RowwiseParallel}
    out: dict[str, Any] = {}
    for path, spec in data["plan"].items():
        if spec["style"] == "SequenceParallel":
            out[path] = SequenceParallel(sequence_dim=spec.get("sequence_dim", 1), use_local_output=True)
        elif spec["style"] in classes:
            out[path] = classes[spec["style"]](input_layouts=layout(spec.get("input_layouts")), output_layouts=layout(spec.get("output_layouts")))
        else:
            raise PlanFormatError(f"unknown style {spec['style']!r} for {path!r}")
    return out
