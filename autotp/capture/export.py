"""Stage 1: capture a model as an ATen graph with a fake-tensor shape on every node.

``torch.export.export(strict=False)`` traces through Python control flow that plain
``fx.symbolic_trace`` cannot (every Hugging Face model we tried), and works on a model on the
``meta`` device, so a 70B model can be planned without allocating it.
"""
from __future__ import annotations

import inspect
import logging
import operator
import re
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from autotp.capture.custom_functions import recording_functions, restore_function_calls
from autotp.capture.torch_compat import data_dependent_guard_error, pytree, set_grad_enabled_hop, unbacked_sizes
from autotp.errors import CaptureError, describe_node, source_line
from autotp.ir.values import TensorMeta

log = logging.getLogger(__name__)


class InputRole(str, Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    CONSTANT = "constant"
    USER_INPUT = "user_input"


@dataclass(frozen=True, slots=True)
class GraphInput:
    """One placeholder of the lifted graph and what it stands for in the user's model."""

    node_name: str
    role: InputRole
    fqns: tuple[str, ...]  # all names of this tensor in the model (tied weights have several)
    persistent: bool = True  # False for buffers registered with persistent=False


@dataclass(frozen=True, slots=True)
class CapturedGraph:
    """The lifted ATen graph: parameters, buffers and user inputs are all placeholders."""

    graph_module: fx.GraphModule
    inputs: tuple[GraphInput, ...]
    unused_fqns: tuple[str, ...]  # parameters/buffers the graph never reads (kept replicated)
    constants: Mapping[str, torch.Tensor]  # lifted tensor constants by placeholder name
    in_spec: object
    out_spec: object
    model_name: str
    training: bool  # the module's mode at capture: export bakes dropout on/off into the graph

    def input_by_node(self) -> Mapping[str, GraphInput]:
        return MappingProxyType({i.node_name: i for i in self.inputs})

    def nodes(self) -> list[fx.Node]:
        return list(self.graph_module.graph.nodes)


def tensor_meta(value: object) -> TensorMeta | None:
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(int(s) for s in value.shape), value.dtype)
    return None


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that produced ``node`` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return next(reversed(stack.values()))[0]


def describe_graph_node(node: fx.Node) -> str:
    """``describe_node`` of a captured fx node: name, op, module and the user's source line."""
    return describe_node(node.name, str(node.target), module_path(node), source_line(node.meta.get("stack_trace")))


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> CapturedGraph:
    """Export ``model`` on ``example_inputs`` (real, meta or fake tensors, global shapes)."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        raise CaptureError(
            f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}; "
            "wrap a single tensor as (x,)"
        )
    with recording_functions():
        exported = _export(model, example_inputs)
        captured = _lift(model, exported)
    _refuse_data_dependent_shapes(captured)
    return captured


def _refuse_data_dependent_shapes(captured: CapturedGraph) -> None:
    """``CaptureError`` at the first node whose output's shape depends on tensor values.

    Plans split tensor dims by their sizes; ``nonzero``, ``masked_select``, ``unique``, boolean-mask
    indexing, ``repeat_interleave`` with a tensor of repeats and the like have a size known only
    when the op runs (an unbacked symbol such as ``u0``), which export leaves in the graph.
    """
    for node in captured.graph_module.graph.nodes:
        for value in pytree.tree_leaves(node.meta.get("val")):
            sizes = unbacked_sizes(value.shape) if isinstance(value, torch.Tensor) else ()
            if sizes:
                shape = ", ".join(str(s) for s in value.shape)
                raise CaptureError(
                    f"model '{captured.model_name}': {describe_graph_node(node)} returns a tensor of shape "
                    f"[{shape}], whose size {', '.join(sizes)} depends on the values of its inputs; autotp "
                    "plans tensors whose shapes are fixed by the example inputs' shapes. Keep the shape "
                    "static: torch.where(cond, a, b) or masked_fill with a mask instead of a boolean index, "
                    "masked_select, nonzero or one-argument torch.where; a fixed-size topk instead of "
                    "unique or nonzero; split sizes given as ints instead of a tensor. Or move the "
                    "data-dependent part out of forward()"
                )


def _export(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> ExportedProgram:
    name = type(model).__name__
    try:
        return torch.export.export(model, example_inputs, strict=False)
    except CaptureError:  # autotp's own refusal from inside the trace (a custom Function): already says what to do
        raise
    except Exception as exc:  # torch.export raises many unrelated types; all mean "cannot capture"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.split(" If this type holds tensors")[0].rstrip(".!")  # pytree advice: not ours
        raise CaptureError(
            f"could not capture model '{name}' with torch.export: {type(exc).__name__}: {reason}"
            f"{_innermost_user_frame(exc)}. {_export_hint(exc, reason, model=model, example_inputs=example_inputs)}"
        ) from exc


_NON_TENSOR_OUTPUT = re.compile(r"Found (?:<class '([\w.]+)'>|(\S+)) in output")
_TWO_DEVICES = re.compile(r"found at least two devices, ([\w:]+) and ([\w:]+)")
_BAD_CALL = re.compile(r"missing a required argument|too many positional arguments|got an unexpected keyword argument|takes \d+ positional argument")
_BAD_DTYPE = re.compile(r"scalar type|dtype|Expected tensor for argument .* to have one of the following", re.IGNORECASE)
_BAD_SHAPE = re.compile(r"reduction dim|shapes cannot be multiplied|size of tensor \w+ \(\d+\) must match|is invalid for input of size|size mismatch")


def _export_hint(exc: BaseException, reason: str, *, model: nn.Module, example_inputs: tuple[Any, ...]) -> str:
    """What to do about one torch.export failure: each known cause gets its own advice.

    Only a guard on a tensor's *values* is data-dependent control flow; blaming it for a
    non-tensor output (a Hugging Face ``DynamicCache``) or for inputs the model rejects sends
    the user to the wrong line.
    """
    non_tensor = _NON_TENSOR_OUTPUT.search(reason)
    if non_tensor:
        found = (non_tensor.group(1) or non_tensor.group(2)).rsplit(".", 1)[-1]
        return (
            f"forward() returns an object of type {found}, which is not a tensor; autotp captures "
            "outputs that are tensors or tuples, lists, dicts and ModelOutputs of tensors. For a "
            "Hugging Face model this is the key/value cache: build it with use_cache=False in its "
            "config (config.use_cache = False); otherwise return only tensors from forward()"
        )
    if isinstance(exc, data_dependent_guard_error()):
        return (
            "forward() branches on or reads a tensor's values (if x.sum() > 0, .item(), int(x)), "
            "which torch.export cannot trace; move that data-dependent Python control flow out of "
            "forward() or express it with torch.cond"
        )
    devices = _TWO_DEVICES.search(reason)
    if devices:
        return (
            f"the model and the example inputs are on different devices ({devices.group(1)} and "
            f"{devices.group(2)}); make the inputs on the model's device, device=\"meta\" for a "
            "model built on the meta device"
        )
    if "numpy" in reason:
        return "forward() leaves torch for numpy, which torch.export cannot trace; use torch ops instead"
    given = _describe_inputs(example_inputs)
    if isinstance(exc, TypeError) and _BAD_CALL.search(reason):
        return (
            f"forward() takes {_forward_params(model)}; example_inputs gave {given}: pass one "
            "value per argument of forward(), in order, as a tuple"
        )
    if _BAD_DTYPE.search(reason):
        return (
            f"example_inputs are {given}, and forward() rejects one's dtype: give each input the "
            "dtype the model expects (int64 token ids for nn.Embedding, the model's floating dtype otherwise)"
        )
    if _BAD_SHAPE.search(reason):
        return (
            f"example_inputs are {given}, and forward() rejects one's shape: give inputs of the "
            "shapes the model expects (the last dim of an nn.Linear's input is its in_features)"
        )
    return (
        "check that model(*example_inputs) runs as a plain call (forward()'s arguments in order, "
        "with the shapes and dtypes it expects); if it does, forward() uses Python that "
        "torch.export.export(model, inputs, strict=False) cannot trace (see the torch.export documentation)"
    )


def _forward_params(model: nn.Module) -> str:
    """``forward``'s parameter names, ``"x, mask=None"`` style, for a hint about a wrong call."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return "arguments that cannot be inspected"
    return ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params) or "no arguments"


def _describe_inputs(example_inputs: tuple[Any, ...]) -> str:
    """``2 tensors (float32[2, 8], int64[2])``: what the user passed, for a hint beside what forward() takes."""
    leaves = [f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
    noun = "tensor" if all(isinstance(x, torch.Tensor) for x in example_inputs) else "value"
    return f"{len(leaves)} {noun}{'' if len(leaves) == 1 else 's'} ({', '.join(leaves)})"


_PYTHON_PATHS = sysconfig.get_paths()


def _innermost_user_frame(exc: BaseException) -> str:
    """The deepest frame of the user's code (not torch, autotp, the standard library or code
    torch compiles at run time such as ``<string>``), as `` (in file:line, function)``."""
    tb = exc.__traceback__
    frame_line = ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        installed = filename.startswith((_PYTHON_PATHS["purelib"], _PYTHON_PATHS["platlib"]))
        stdlib = filename.startswith(_PYTHON_PATHS["stdlib"]) and not installed  # site-packages may sit inside
        if "/torch/" not in filename and "/autotp/" not in filename and not stdlib and not filename.startswith("<"):
            frame_line = f" (in {filename}:{tb.tb_lineno}, {tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    return frame_line


def _lift(model: nn.Module, exported: ExportedProgram) -> CapturedGraph:
    gm = exported.graph_module
    signature = exported.graph_signature
    aliases = _tied_names(model)
    non_persistent = set(signature.non_persistent_buffers)
    roles: dict[str, tuple[InputRole, str | None]] = {}
    for spec in signature.input_specs:
        role = {
            InputKind.PARAMETER: InputRole.PARAMETER,
            InputKind.BUFFER: InputRole.BUFFER,
            InputKind.CONSTANT_TENSOR: InputRole.CONSTANT,
            InputKind.USER_INPUT: InputRole.USER_INPUT,
        }.get(spec.kind)
        if role is None:
            raise CaptureError(f"unsupported graph input kind {spec.kind} for '{spec.arg.name}'")
        roles[spec.arg.name] = (role, spec.target)

    _inline_grad_mode_regions(gm)  # the graph only: recompiled once below
    restore_function_calls(gm)
    gm.graph.eliminate_dead_code()
    inputs: list[GraphInput] = []
    constants: dict[str, torch.Tensor] = {}
    seen_fqns: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "placeholder":
            continue
        role, target = roles[node.name]
        if role is not InputRole.USER_INPUT and not node.users:
            gm.graph.erase_node(node)  # an unused or tied duplicate: dropped from the graph
            continue
        fqns: tuple[str, ...] = ()
        if role is InputRole.CONSTANT:
            constants[node.name] = exported.constants[target]
        elif target is not None:
            fqns = aliases.get(target, (target,))
            seen_fqns.update(fqns)
        inputs.append(GraphInput(node.name, role, fqns, persistent=target not in non_persistent))
    gm.recompile()

    all_fqns = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    all_fqns += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    unused = tuple(n for n in all_fqns if n not in seen_fqns)
    return CapturedGraph(
        graph_module=gm,
        inputs=tuple(inputs),
        unused_fqns=unused,
        constants=MappingProxyType(constants),
        in_spec=exported.call_spec.in_spec,
        out_spec=exported.call_spec.out_spec,
        model_name=type(model).__name__,
        training=model.training,
    )


def _inline_grad_mode_regions(gm: fx.GraphModule) -> None:
    """Inline ``wrap_with_set_grad_enabled`` regions, so every op is a plain graph node.

    Export wraps code that changes the grad mode (``@torch.no_grad()`` on Hugging Face rotary
    embeddings) in a higher-order op that calls a submodule. Its body is copied into the graph in
    its place; the outputs of a ``no_grad`` region are ``detach``ed, so gradients stop there just
    as they did in the original. Any other higher-order op is refused by name. Only the graph is
    edited: the caller recompiles ``gm`` once (generating the code of a 2,000-node graph takes
    a tenth of a second).
    """
    set_grad_enabled = set_grad_enabled_hop()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not set_grad_enabled:
            continue
        enabled, body_attr, *operands = node.args
        body: fx.GraphModule = getattr(gm, body_attr.target)
        _inline_grad_mode_regions(body)
        env: dict[fx.Node, fx.Node] = {}
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, operands))
        outputs: tuple[Any, ...] = ()
        with gm.graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    results = fx.node.map_arg(inner.args[0], env.__getitem__)
                    outputs = tuple(results) if isinstance(results, (list, tuple)) else (results,)
                    break
                env[inner] = gm.graph.node_copy(inner, env.__getitem__)
            if not enabled:
                outputs = tuple(_detached(gm.graph, out) for out in outputs)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:  # a single output read directly
            node.replace_all_uses_with(outputs[0])
        gm.graph.erase_node(node)
        if not body_attr.users:
            gm.graph.erase_node(body_attr)
            delattr(gm, body_attr.target)
    leftover = [n for n in gm.graph.nodes if n.op == "get_attr"]
    if leftover:
        ops = sorted({str(u.target) for n in leftover for u in n.users})
        raise CaptureError(
            f"the captured graph calls higher-order ops autotp cannot split yet ({', '.join(ops)}); "
            "remove the torch.cond / autocast / checkpoint region from forward() or file an issue"
        )


def _detached(graph: fx.Graph, value: fx.Node) -> fx.Node:
    if not isinstance(value.meta.get("val"), torch.Tensor):
        return value
    out = graph.call_function(torch.ops.aten.detach.default, (value,))
    out.meta.update({k: value.meta[k] for k in ("val", "tensor_meta", "nn_module_stack", "stack_trace") if k in value.meta})
    return out


def _tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Map every parameter/buffer name to all names sharing the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(tensor), []).append(name)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(buffer), []).append(name)
    return {name: tuple(names) for names in by_id.values() for name in names}
