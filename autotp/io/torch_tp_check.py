"""Check a ``parallelize_module`` plan against the model's own code, on rank-local shapes.

Under ``parallelize_module`` the code between styled modules runs on plain rank-local tensors,
so it must compute rank-local sizes. ``check_torch_tp`` captures the model as rank 0 runs it
under the styles (a meta copy, no process group) and compares every op outside the styled
modules with the shape the autotp plan gives it on rank 0. See ``autotp.io.torch_tp``.
"""
from __future__ import annotations

import copy
import fnmatch
import linecache
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from autotp.capture.export import capture, describe_graph_node, module_path
from autotp.capture.torch_compat import op_schema
from autotp.errors import AutoTPError, TorchTPExportError
from autotp.io.fingerprint import LAYOUT_ONLY_OPS
from autotp.io.torch_tp import WHAT_TO_DO, TorchTPPlan
from autotp.ir.placement import Partial, Placement, R, Shard
from autotp.ir.plan import Plan
from autotp.ir.values import ValueRef, output_metas
from autotp.strategies.engine import NodeKind


def check_torch_tp(tp: TorchTPPlan, *, plan: Plan, model: nn.Module, example_inputs: tuple[Any, ...]) -> None:
    """Capture ``model`` as rank 0 runs it under ``tp``'s styles and compare every op outside the
    styled modules with the rank-local shape the plan gives it, and the outputs with the model's
    full outputs; :class:`TorchTPExportError` on the first difference. ``export_torch_tp`` runs it;
    call it yourself on a hand-edited ``TorchTPPlan``.

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
            f"sizes does not. What to do: reshape with -1 there, or {WHAT_TO_DO}."
        ) from exc
    _compare_ops(captured.graph_module.graph, styled, _planned_local_shapes(plan))
    _compare_outputs(captured.graph_module.graph, plan)


def _compare_ops(graph: torch.fx.Graph, styled: list[str], planned: dict[tuple[str, str, int], tuple[str, tuple[tuple[int, ...], ...]]]) -> None:
    """Each op outside the styled modules, matched to the plan by (module, op, occurrence), has
    the plan's rank-local shape, and no planned op is missing."""
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for node in graph.nodes:
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
                f"{describe_graph_node(node)} computes rank-local shape(s) {found}, but {expected}; the model's "
                f"code in module '{path or '(model)'}' computes a size from global values (a head count, "
                f"a width), so it would run differently from the plan. What to do: reshape with -1 on the "
                f"split dim (view(B, T, -1, head_dim)), or {WHAT_TO_DO}."
            )
    missing = [
        (path, op, name) for (path, op, k), (name, _) in planned.items()
        if k >= seen[(path, op)] and not any(_inside(path, m) for m in styled)
    ]
    if missing:
        path, op, name = missing[0]
        raise TorchTPExportError(
            f"cannot export this plan for parallelize_module: under the styles the model's code in module "
            f"'{path or '(model)'}' does not run the plan's node {name} ({op}): it takes another path on "
            f"rank-local tensors. What to do: {WHAT_TO_DO}."
        )


def _compare_outputs(graph: torch.fx.Graph, plan: Plan) -> None:
    """Every rank must return the model's full outputs: a style whose ``output_layouts`` leaves
    the last module's output split would hand each rank its shard instead."""
    (output,) = (n for n in graph.nodes if n.op == "output")
    found = tuple(s for a in output.all_input_nodes for s in _value_shapes(a.meta.get("val")))
    (planned,) = (n for n in plan.nodes if n.kind is NodeKind.OUTPUT)
    want = tuple(_global_shapes(plan, ref) for ref in planned.inputs)
    if found != want:
        raise TorchTPExportError(
            f"cannot export this plan for parallelize_module: under its styles each rank returns outputs of shape(s) "
            f"{found}, the model returns {want}; a style leaves an output split. What to do: {WHAT_TO_DO}."
        )


def _global_shapes(plan: Plan, ref: ValueRef) -> tuple[int, ...]:
    node = next(n for n in plan.nodes if n.name == ref.node)
    return output_metas(node.output_meta)[ref.index or 0].shape


def _op_name(node: torch.fx.Node) -> str:
    """The op as a plan names it: ``aten.view.default``, or a Python callable's name (``getitem``)."""
    target = node.target
    return str(target) if op_schema(target) is not None or not callable(target) else getattr(target, "__name__", str(target))


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
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise TorchTPExportError(
                f"cannot export this plan for parallelize_module: module '{path}' is a {type(module).__name__}, and "
                f"{style.style} shards nn.Linear and nn.Embedding only. What to do: {WHAT_TO_DO}."
            )
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
        shapes = [meta.shape for meta in output_metas(node.output_meta)]
        if not shapes:
            continue
        local = []
        for shape, placement in zip(shapes, node.strategy.axis(0).outputs()):  # a 1-D plan: torch_tp_plan refuses N-D ones
            if isinstance(placement, Shard):
                shape = shape[: placement.dim] + (_local_size(shape[placement.dim], plan.tp_size),) + shape[placement.dim + 1:]
            local.append(shape)
        key = (node.module_path, node.op)
        out[key + (seen[key],)] = (node.name, tuple(local))
        seen[key] += 1
    return out
