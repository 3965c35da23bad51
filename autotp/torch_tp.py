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
captures the model as one rank runs it under the styles (meta tensors, rank-local parameter
shapes) and compares every op outside the styles with the plan's rank-local shapes. A plan that
is not expressible, or a model whose code does not follow, is refused with a
:class:`~autotp.errors.TorchTPExportError` naming the module and what to do; nothing is written
that would run differently from the plan.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import linecache
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autotp.capture import capture, module_path
from autotp.errors import AutoTPError, TorchTPExportError, describe_node
from autotp.fingerprint import LAYOUT_ONLY_OPS
from autotp.placement import Partial, Placement, R, Replicate, Shard, parse_placement
from autotp.plan import NodePlan, Plan
from autotp.strategies import NodeKind

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


def _ndim(value: str) -> int:
    """``float32[2,16,64]`` -> 3."""
    match = re.search(r"\[([^\]]*)\]", value)
    return 0 if match is None or not match.group(1) else match.group(1).count(",") + 1


def _split(ref: str) -> tuple[str, int | None]:
    match = re.fullmatch(r"(.*)\[(\d+)\]", ref)
    return (match.group(1), int(match.group(2))) if match else (ref, None)


class _Graph:
    """The plan as a graph: producers, consumers and the placement each consumer reads."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.nodes = {n.name: n for n in plan.nodes}
        self.readers: dict[str, list[tuple[NodePlan, int]]] = defaultdict(list)
        for node in plan.nodes:
            for slot, ref in enumerate(node.inputs):
                self.readers[ref].append((node, slot))

    def produced(self, ref: str) -> Placement:
        name, index = _split(ref)
        node = self.nodes[name]
        return node.strategy.outputs()[index] if index is not None else node.strategy.output  # type: ignore[return-value]

    def reads(self, ref: str) -> set[Placement]:
        return {node.strategy.inputs[slot] for node, slot in self.readers[ref]}


def torch_tp_plan(plan: Plan) -> TorchTPPlan:
    """The ``parallelize_module`` plan equivalent to ``plan``, as far as the styles reach."""
    graph = _Graph(plan)
    styles: dict[str, Style] = {}
    styled_nodes: dict[str, str] = {}  # op node -> module path
    problems: list[dict[str, str]] = []
    effective: dict[str, Placement] = {}  # value -> placement the code after its module sees

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
                effective[main[0].name] = style.output_layouts  # type: ignore[assignment]
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
    s = node.strategy
    out = s.output
    if all(p == R for p in (*s.inputs, *node.strategy.outputs())):
        return None, ""
    last = _ndim(node.value) - 1
    reads = graph.reads(node.name)
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
            producer = graph.nodes[_split(ref)[0]]
            want = R if producer.kind is NodeKind.STATE else Shard(1)
            if node.strategy.inputs[slot] != want:
                return False
        if any(p != Shard(1) for p in node.strategy.outputs()):
            return False
    return True


def _fill_inputs(styles: dict[str, Style], styled_nodes: dict[str, str], graph: _Graph, effective: dict[str, Placement]) -> None:
    """``input_layouts`` of each linear style: how its input arrives from the code before it."""
    for name, module in styled_nodes.items():
        style = styles[module]
        if style.style == "SequenceParallel":
            continue
        node = graph.nodes[name]
        ref = node.inputs[1] if node.op.startswith(_EMBEDDING) else node.inputs[0]
        arriving = effective.get(ref, graph.produced(ref))
        styles[module] = Style(style.style, arriving, style.output_layouts)


def _check_unstyled(plan: Plan, graph: _Graph, styled_nodes: dict[str, str], effective: dict[str, Placement]) -> list[dict[str, str]]:
    """Conversions outside linear styles have no style to run them; a SequenceParallel module
    must receive its activations already split on the sequence dim."""
    problems = []
    for node in plan.nodes:
        if node.kind not in (NodeKind.OP, NodeKind.OUTPUT):
            continue
        if node.name in styled_nodes and node.op.startswith(_LINEAR + _EMBEDDING):
            continue  # the style converts its input (input_layouts -> what it computes on)
        for slot, ref in enumerate(node.inputs):
            producer_name = _split(ref)[0]
            if styled_nodes.get(producer_name) is not None and graph.nodes[producer_name].op.startswith(_LINEAR + _EMBEDDING):
                arriving = effective[producer_name]
            else:
                arriving = graph.produced(ref)
                if producer_name in styled_nodes:  # SequenceParallel keeps the shards
                    arriving = Shard(1)
            wanted = node.strategy.inputs[slot]
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
        if node.kind is not NodeKind.STATE or not isinstance(node.strategy.output, Shard):
            continue
        owners = {styled_nodes.get(c.name) for c, _ in graph.readers[node.name]}
        if None in owners:
            ops = ", ".join(sorted({c.op for c, _ in graph.readers[node.name] if c.name not in styled_nodes}))
            problems.append({
                "module": node.module_path, "node": node.name,
                "why": f"parameter {node.name} is split {node.strategy.output} but read by {ops} outside a styled module "
                "(styles shard nn.Linear (aten.linear) and nn.Embedding (aten.embedding) modules only)",
            })
        elif len(owners) > 1:
            problems.append({"module": node.module_path, "node": node.name, "why": f"parameter {node.name} is shared by modules {', '.join(sorted(owners))} (tied weights); each style would shard it again"})
    return problems


def _collapse(styles: dict[str, Style], plan: Plan) -> dict[str, Style]:
    """``blocks.0.mlp.c_fc`` ... ``blocks.11.mlp.c_fc`` with one style -> ``blocks.*.mlp.c_fc``."""
    indices: dict[str, set[int]] = defaultdict(set)
    for node in plan.nodes:
        match = re.match(r"^(.*?)\.(\d+)(\.|$)", node.module_path)
        if match:
            indices[match.group(1)].add(int(match.group(2)))
    groups: dict[tuple[str, str], dict[int, Style]] = defaultdict(dict)
    for path, style in styles.items():
        match = re.match(r"^(.*?)\.(\d+)\.(.*)$", path)
        if match:
            groups[(match.group(1), match.group(3))][int(match.group(2))] = style
    out: dict[str, Style] = {}
    for path, style in styles.items():
        match = re.match(r"^(.*?)\.(\d+)\.(.*)$", path)
        if match:
            container, rest = match.group(1), match.group(3)
            members = groups[(container, rest)]
            if set(members) == indices[container] and len(set(members.values())) == 1 and len(members) > 1:
                out[f"{container}.*.{rest}"] = style
                continue
        out[path] = style
    return out


# ----------------------------------------------------------------------------------------------
# refusing what the styles cannot run


_WHAT_TO_DO = (
    "run this plan with autotp.parallelize (or save it with --format json and load it with "
    "autotp.Plan.load), which inserts every conversion itself; or make a plan whose splits sit "
    "on linears in column/row pairs (pin them: autotp.layouts.megatron_pins)"
)
_SHOWN = 6  # problems listed in a refusal; the rest are counted


def export_torch_tp(plan: Plan, *, model: nn.Module, example_inputs: tuple[Any, ...]) -> TorchTPPlan:
    """The ``parallelize_module`` plan that runs ``model`` as ``plan`` does, checked against the
    model's own code; :class:`TorchTPExportError` when the styles cannot express the plan or
    the model's code does not run on rank-local tensors."""
    tp = torch_tp_plan(plan)
    if tp.not_expressible:
        raise TorchTPExportError(_inexpressible_message(tp))
    if tp.styles:
        _check_local_shapes(tp, plan, model, example_inputs)
    return tp


def _inexpressible_message(tp: TorchTPPlan) -> str:
    lines = [
        f"cannot export this plan for parallelize_module: {len(tp.not_expressible)} part(s) of it are beyond "
        "ColwiseParallel/RowwiseParallel/SequenceParallel, which convert layouts only at a styled "
        "linear's or embedding's input and output, and would run differently from the plan:"
    ]
    by_pattern: dict[str, list[dict[str, str]]] = defaultdict(list)  # blocks.0.ln_1, blocks.1.ln_1 -> blocks.*.ln_1
    for problem in tp.not_expressible:
        by_pattern[re.sub(r"\.\d+(\.|$)", r".*\1", problem["module"])].append(problem)
    for pattern, problems in list(by_pattern.items())[:_SHOWN]:
        first, more = problems[0], f" (and {len(problems) - 1} more in '{pattern}')" if len(problems) > 1 else ""
        lines.append(f"  module '{first['module'] or '(model)'}'{more}, node {first['node']}: {first['why']}")
    if len(by_pattern) > _SHOWN:
        lines.append(f"  ... and {sum(len(p) for p in list(by_pattern.values())[_SHOWN:])} more in {len(by_pattern) - _SHOWN} other modules")
    lines.append(f"What to do: {_WHAT_TO_DO}.")
    return "\n".join(lines)


def _check_local_shapes(tp: TorchTPPlan, plan: Plan, model: nn.Module, example_inputs: tuple[Any, ...]) -> None:
    """Capture ``model`` as rank 0 runs it under ``tp``'s styles and compare every op outside the
    styled modules with the rank-local shape the plan gives it.

    The copy lives on the meta device. Each styled module gets rank-local parameter shapes and
    hooks that take its input from ``input_layouts`` to the layout it computes on, and its output
    to ``output_layouts`` (``parallelize_module``'s conversions, in shapes only). The code between
    styled modules then sees what it will see under ``parallelize_module``:

        view(B, T, self.n_head, hd) on a (B, T, C/tp) tensor   -> fails to capture: refused
        view(B, T, self.n_head, -1)                            -> (B, T, n_head, hd/tp), the plan
                                                                  says (B, T, n_head/tp, hd): refused
        view(B, T, -1, hd)                                     -> (B, T, n_head/tp, hd): as planned
    """
    local = _meta_copy(model)
    styled = _style_locally(local, tp)
    inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs)
    try:
        captured = capture(local, inputs)
    except AutoTPError as exc:
        cause = exc.__cause__ or exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise TorchTPExportError(
            f"cannot export this plan for parallelize_module: under its styles ({', '.join(tp.styles)}) "
            f"{_failing_code(cause, local)} fails on rank-local tensors: {type(cause).__name__}: {reason}. "
            f"A module between styled ones sees local shards, so a reshape must compute rank-local sizes: "
            f"view(B, T, -1, head_dim) works, view(B, T, self.n_head, head_dim) or view(B, T, C) with global "
            f"sizes does not. What to do: reshape with -1 there, or {_WHAT_TO_DO}."
        ) from exc
    planned = _planned_local_shapes(plan)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for node in captured.graph_module.graph.nodes:
        found = _value_shapes(node.meta.get("val")) if node.op == "call_function" else None
        path = module_path(node)
        if not found or _op_name(node) in LAYOUT_ONLY_OPS or any(_inside(path, m) for m in styled):
            continue
        key = (path, _op_name(node))
        name, want = planned.get((*key, seen[key]), ("", ()))
        seen[key] += 1
        if want != found:
            expected = f"the plan's node {name} has rank-local shape(s) {want}" if name else "the plan has no such op there"
            raise TorchTPExportError(
                f"cannot export this plan for parallelize_module: under the styles, "
                f"{describe_node(node)} computes rank-local shape(s) {found}, but {expected}; the model's "
                f"code in module '{path or '(model)'}' computes a size from global values (a head count, "
                f"a width), so it would run differently from the plan. What to do: reshape with -1 on the "
                f"split dim (view(B, T, -1, head_dim)), or {_WHAT_TO_DO}."
            )


def _op_name(node: torch.fx.Node) -> str:
    """The op as a plan names it: ``aten.view.default``, or a Python callable's name (``getitem``)."""
    target = node.target
    return str(target) if hasattr(target, "_schema") or not callable(target) else getattr(target, "__name__", str(target))


def _failing_code(exc: BaseException, model: nn.Module) -> str:
    """``module 'blocks.0.attn' (gpt.py:69: q = ...)``: the innermost ``forward`` of ``model`` in
    ``exc``'s traceback, with the line it failed on."""
    paths = {id(m): path for path, m in model.named_modules()}
    found = "the model's code"
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if id(owner) in paths and not frame.f_code.co_filename.startswith(torch.__path__[0]):
            line = linecache.getline(frame.f_code.co_filename, tb.tb_lineno).strip()
            found = f"module '{paths[id(owner)] or '(model)'}' ({frame.f_code.co_filename}:{tb.tb_lineno}: {line})"
        tb = tb.tb_next
    return found


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device (tied ones stay tied);
    the original's tensors are not copied."""
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _matches(path: str, pattern: str) -> bool:
    """``parallelize_module``'s matching: one ``fnmatch`` per dotted token."""
    names, tokens = path.split("."), pattern.split(".")
    return len(names) == len(tokens) and all(fnmatch.fnmatchcase(n, t) for n, t in zip(names, tokens))


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def _style_locally(model: nn.Module, tp: TorchTPPlan) -> list[str]:
    """Give each styled module of ``model`` (a meta copy) rank-local parameters and layout hooks;
    returns their paths."""
    styled = []
    for path, module in model.named_modules():
        style = next((s for pattern, s in tp.styles.items() if _matches(path, pattern)), None)
        if style is None or style.style == "SequenceParallel":  # replicated parameters, local in and out
            continue
        styled.append(path)
        is_embedding = isinstance(module, nn.Embedding)
        column = style.style == "ColwiseParallel"
        weight_dim = (1 if is_embedding else 0) if column else (0 if is_embedding else 1)
        for name, param in list(module.named_parameters(recurse=False)):
            dim = weight_dim if name == "weight" else 0 if column else None  # a row-parallel bias is replicated
            if dim is not None:
                shape = list(param.shape)
                shape[dim] = _local_size(shape[dim], tp.tp_size)
                setattr(module, name, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=param.requires_grad))
        computes_on = R if column or is_embedding else _LAST
        produces = _LAST if column else Partial()
        module.register_forward_pre_hook(_input_hook(style.input_layouts or computes_on, computes_on, tp.tp_size))
        module.register_forward_hook(_output_hook(produces, style.output_layouts or (_LAST if column else R), tp.tp_size))
    return styled


_LAST = "S(-1)"  # the styles' default Shard(-1): split on the last dim, whatever the rank


def _local_size(size: int, tp_size: int) -> int:
    """Rank 0's share of a split dim (``torch.chunk``: the first shares are the larger)."""
    return -(-size // tp_size)


def _relayout(x: torch.Tensor, src: Placement | str, dst: Placement | str, tp_size: int) -> torch.Tensor:
    """Rank 0's local tensor of ``x`` (local in ``src``) once in ``dst``, in shape only."""
    src, dst = (Shard(x.dim() - 1) if p == _LAST else p for p in (src, dst))
    if src == dst:
        return x
    full = torch.cat([x] * tp_size, dim=src.dim) if isinstance(src, Shard) else x  # (..., size * tp, ...)
    if not isinstance(dst, Shard):
        return full
    return full.narrow(dst.dim, 0, _local_size(full.size(dst.dim), tp_size))


def _input_hook(arrives: Placement | str, computes_on: Placement | str, tp_size: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (_relayout(args[0], arrives, computes_on, tp_size), *args[1:])
    return hook


def _output_hook(produces: Placement | str, leaves_as: Placement | str, tp_size: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return _relayout(output, produces, leaves_as, tp_size)
    return hook


def _value_shapes(value: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes of a node's tensor output(s): ``()`` when it makes no tensor."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        return ()
    return tuple(tuple(int(d) for d in v.shape) for v in values)


def _planned_local_shapes(plan: Plan) -> dict[tuple[str, str, int], tuple[str, tuple[tuple[int, ...], ...]]]:
    """(module path, op, occurrence in that module) -> (node, rank 0's output shape(s) under the plan)."""
    out: dict[tuple[str, str, int], tuple[str, tuple[tuple[int, ...], ...]]] = {}
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for node in plan.nodes:
        if node.kind is not NodeKind.OP or node.op in LAYOUT_ONLY_OPS:
            continue
        shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([^\]]*)\]", node.value)]
        if not shapes:
            continue
        local = []
        for shape, placement in zip(shapes, node.strategy.outputs()):
            if isinstance(placement, Shard):
                shape = shape[: placement.dim] + (_local_size(shape[placement.dim], plan.tp_size),) + shape[placement.dim + 1:]
            local.append(shape)
        key = (node.module_path, node.op)
        out[(*key, seen[key])] = (node.name, tuple(local))
        seen[key] += 1
    return out


# ----------------------------------------------------------------------------------------------
# emitting and applying


def dumps_torch_tp(plan: Plan, *, model: nn.Module, example_inputs: tuple[Any, ...], python: bool = False, title: str = "") -> str:
    """JSON (``python=False``) or a Python module defining ``PLAN`` for ``parallelize_module``;
    :class:`TorchTPExportError` where that would not run as ``plan`` does (see ``export_torch_tp``)."""
    tp = export_torch_tp(plan, model=model, example_inputs=example_inputs)
    if not python:
        return json.dumps(tp.to_dict(), indent=1) + "\n"
    lines = [
        f'"""{title or "autotp plan"} as a torch.distributed.tensor.parallel plan for {tp.tp_size} ranks.',
        "",
        "    from torch.distributed.tensor.parallel import parallelize_module",
        "    parallelize_module(model, mesh, PLAN)",
        "",
        "autotp checked the model's code against the plan on rank-local shapes: it runs as planned.",
        '"""',
        "from torch.distributed.tensor import Partial, Replicate, Shard",
        "from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel",
        "",
        "PLAN = {",
    ]
    lines += [f"    {path!r}: {_style_source(style)}," for path, style in tp.styles.items()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _placement_source(p: Placement) -> str:
    if isinstance(p, Shard):
        return f"Shard({p.dim})"
    return "Replicate()" if isinstance(p, Replicate) else "Partial()"


def _style_source(style: Style) -> str:
    args = []
    if style.sequence_dim is not None:
        args.append(f"sequence_dim={style.sequence_dim}")
        args.append("use_local_output=True")
    if style.input_layouts is not None:
        args.append(f"input_layouts={_placement_source(style.input_layouts)}")
    if style.output_layouts is not None:
        args.append(f"output_layouts={_placement_source(style.output_layouts)}")
    return f"{style.style}({', '.join(args)})"


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
