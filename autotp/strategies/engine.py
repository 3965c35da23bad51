"""Stage 2: the candidate strategies of every node on one mesh axis, from the rule registry.

Every tensor a node reads is an input *slot*, named by a ``ValueRef`` (producer node, and the
output index for multi-output ops read through ``getitem``). The engine adds all-replicate to
every op, drops strategies that split a dim ``tp_size`` does not divide, and gives ops without a
rule a replicate-only strategy (correct, slower) with one warning naming them.
"""
from __future__ import annotations

import itertools
import logging
import math
import operator
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import fx

from autotp.capture.export import CapturedGraph, GraphInput, InputRole, describe_graph_node, module_path, tensor_meta
from autotp.capture.torch_compat import op_schema
from autotp.errors import ConfigError, describe_node, source_line
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import Partial, Placement, Placements, R, Shard
from autotp.ir.strategy import MeshStrategy, NodeKind, OutputPlacement
from autotp.ir.values import TensorMeta, ValueRef
from autotp.strategies.mutation import replicated_by_mutation
from autotp.strategies.op_facts import draws_random
from autotp.strategies.rules import OpContext, OpStrategy, lookup
from autotp.strategies.rules.registry import OutputMeta, Rule

log = logging.getLogger(__name__)

aten = torch.ops.aten

# Ops that only check metadata and return nothing: dropped from the rank-local graph.
ASSERT_OPS = frozenset({aten._assert_tensor_metadata.default, aten._assert_scalar.default})


class UnsupportedOpWarning(UserWarning):
    """An op has no sharding rule (or its rule failed on this call) and will run replicated."""


# What a rule's arithmetic on metas raises when a call is outside the forms it was written for
# (a 0-d tensor, an empty index, a list output): the op then runs replicated, named in the warning.
_RULE_ERRORS = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError, NotImplementedError)


@dataclass(frozen=True, slots=True)
class NodeSpace:
    """One graph node with its input slots and candidate strategies."""

    name: str
    op: str
    module_path: str
    kind: NodeKind
    slots: tuple[ValueRef, ...]
    slot_metas: tuple[TensorMeta, ...]
    output_meta: OutputMeta | None
    strategies: tuple[MeshStrategy, ...]
    is_view: bool = False
    fallback: bool = False  # replicate-only because no rule covers the op, or its rule raised
    fallback_reason: str = ""  # why a rule's strategies could not be used ("" when there is no rule)
    requires_grad: bool = False  # a floating output that depends on a parameter
    is_parameter: bool = False  # a trainable parameter placeholder (gradients, optimizer state)
    # per strategy (same order), collectives its local implementation runs: (kind, nbytes, mesh axis),
    # nbytes of the tensor as the other axes leave it on one rank
    internal_comm: tuple[tuple[tuple[str, int, int], ...], ...] = ()
    source: str = ""  # the user's line it came from (``errors.source_line``), for error messages

    def describe(self) -> str:
        """This node for an error message: name, op, module and the user's source line."""
        return describe_node(self.name, self.op, self.module_path, self.source)

    def output_placement(self, strategy: MeshStrategy, index: int | None) -> Placements:
        return strategy.output_at(index)

    def output_value_meta(self, index: int | None) -> TensorMeta:
        meta = self.output_meta
        return meta[index] if index is not None else meta  # type: ignore[index,return-value]


@dataclass(frozen=True, slots=True)
class StrategySpace:
    mesh: MeshSpec
    nodes: tuple[NodeSpace, ...]  # topological order
    unsupported_ops: tuple[str, ...]

    def by_name(self) -> Mapping[str, NodeSpace]:
        return MappingProxyType({n.name: n for n in self.nodes})

    @property
    def tp_size(self) -> int:
        """The ranks of a 1-D mesh (what the 1-D-only paths, such as the torch-TP export, read)."""
        if self.mesh.ndim != 1:
            raise ConfigError(f"this needs a 1-D mesh; the plan is for the mesh {self.mesh}")
        return self.mesh.shape[0]


def iter_node_args(args: Any) -> Iterator[fx.Node]:
    """fx.Nodes inside (nested) args in a fixed order; the rewriter walks them the same way."""
    if isinstance(args, fx.Node):
        yield args
    elif isinstance(args, (list, tuple)):
        for a in args:
            yield from iter_node_args(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from iter_node_args(a)


def slot_nodes(node: fx.Node, rule: Rule | None) -> list[fx.Node]:
    """The tensor-valued fx.Node arguments of ``node`` that are input slots, in order."""
    metadata = set(rule.metadata_args) if rule is not None else set()
    nodes: list[fx.Node] = []
    for i, arg in enumerate(node.args):
        if i not in metadata:
            nodes.extend(iter_node_args(arg))
    nodes.extend(iter_node_args(node.kwargs))
    return [n for n in nodes if is_tensor_value(n)]


def is_tensor_value(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor) or _is_multi_output(node)


def _is_multi_output(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (list, tuple)) and len(val) > 0 and all(isinstance(v, torch.Tensor) for v in val)


def output_meta(node: fx.Node) -> OutputMeta | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tensor_meta(val)
    if _is_multi_output(node):
        return tuple(tensor_meta(v) for v in val)  # type: ignore[union-attr, misc]  # _is_multi_output checked val
    return None


def _replicated_output(meta: OutputMeta | None) -> OutputPlacement:
    return tuple(R for _ in meta) if isinstance(meta, tuple) else R


def _fits(placement: Placement, meta: TensorMeta, tp_size: int) -> bool:
    """Shards must divide evenly; partial sums exist only for floating-point values."""
    if isinstance(placement, Shard):
        return placement.dim < meta.ndim and meta.shape[placement.dim] % tp_size == 0 and meta.shape[placement.dim] >= tp_size
    if isinstance(placement, Partial):
        return meta.dtype.is_floating_point or meta.dtype.is_complex
    return True


def _strategy_fits(strategy: OpStrategy, slot_metas: tuple[TensorMeta, ...], out: OutputMeta | None, tp_size: int) -> bool:
    if len(strategy.inputs) != len(slot_metas):
        return False
    if not all(_fits(p, m, tp_size) for p, m in zip(strategy.inputs, slot_metas)):
        return False
    if isinstance(out, tuple):
        outs = strategy.output if isinstance(strategy.output, tuple) else ()
        return len(outs) == len(out) and all(_fits(p, m, tp_size) for p, m in zip(outs, out))
    return out is not None and not isinstance(strategy.output, tuple) and _fits(strategy.output, out, tp_size)


def _splits_divide(strategy: MeshStrategy, metas: Sequence[TensorMeta], mesh_shape: tuple[int, ...]) -> bool:
    """Where several axes split one tensor dim (nested, outer axis first: DTensor's order), the
    product of their sizes divides it (each axis alone was checked against the rule's answer)."""
    for placements, meta in zip((*strategy.inputs, *strategy.outputs), metas):
        split: dict[int, int] = {}
        for axis, p in enumerate(placements):
            if isinstance(p, Shard):
                split[p.dim] = split.get(p.dim, 1) * mesh_shape[axis]
        if any(meta.shape[dim] % count for dim, count in split.items()):
            return False
    return True


def combine_axes(
    per_axis: Sequence[Sequence[OpStrategy]], metas: Sequence[TensorMeta], mesh_shape: tuple[int, ...],
    keep: Callable[[tuple[OpStrategy, ...]], bool] = lambda axes: True,
) -> tuple[MeshStrategy, ...]:
    """Every combination of one single-axis strategy per mesh axis whose splits divide their dims
    (``metas``: of the inputs, then the outputs) and that passes ``keep``, in a fixed order
    (all-``R`` first when every axis lists it first)."""
    combined = []
    for axes in itertools.product(*per_axis):
        strategy = MeshStrategy.from_axes(axes)
        if _splits_divide(strategy, metas, mesh_shape) and keep(axes):
            combined.append(strategy)
    return tuple(combined)


class AxisRole(str, Enum):
    """What parameters may do on one mesh axis (``axis_roles``): the solver picks the rest."""

    ANY = "any"  # replicated or split: tensor parallelism, FSDP or data parallelism, as priced
    DATA = "data"  # replicated on the axis: data parallelism (gradients all-reduced over it)
    FSDP = "fsdp"  # split on the axis (where a dim divides), all-gathered before use


def axis_role_map(mesh: MeshSpec, roles: Mapping[int | str, str] | None) -> dict[int, AxisRole]:
    """``roles`` keyed by axis index; ``ConfigError`` naming the axis or role that is not known."""
    out: dict[int, AxisRole] = {}
    for axis, role in (roles or {}).items():
        try:
            out[mesh.axis_index(axis)] = AxisRole(role)
        except ValueError:
            raise ConfigError(f"axis_roles[{axis!r}] is {role!r}; an axis role is one of {', '.join(r.value for r in AxisRole)}") from None
    return out


def build_strategy_space(captured: CapturedGraph, mesh: MeshSpec | int, *, axis_roles: Mapping[int, AxisRole] | None = None) -> StrategySpace:
    """Candidate strategies of every node of ``captured`` on ``mesh`` (an int: a 1-D mesh of that
    many ranks); ``axis_roles`` restricts where parameters may be split (``AxisRole``)."""
    if isinstance(mesh, int):
        mesh = MeshSpec.of(mesh)
    roles = dict(axis_roles or {})
    inputs = captured.input_by_node()
    metas: dict[str, OutputMeta | None] = {}
    grads: dict[str, bool] = {}
    spaces: list[NodeSpace] = []
    unsupported: dict[str, NodeSpace] = {}  # op -> its first node
    known_calls: dict[Hashable, NodeSpace] = {}
    written = replicated_by_mutation(captured.graph_module.graph)
    for node in captured.graph_module.graph.nodes:
        meta = output_meta(node)
        metas[node.name] = meta
        if node.op == "placeholder":
            space = _placeholder_space(node, meta, inputs[node.name], mesh, roles)
        elif node.op == "output":
            space = _output_space(node, metas, mesh)
        elif node.op == "call_function":
            if node.target in ASSERT_OPS:
                continue
            space = _op_space(node, meta, metas, mesh, known_calls)
            floating = all(m.dtype.is_floating_point for m in (meta if isinstance(meta, tuple) else (meta,)) if m is not None) and meta is not None
            space = replace(space, requires_grad=floating and any(grads[ref.node] for ref in space.slots))
            if space.fallback:
                unsupported.setdefault(space.op, space)
        else:
            raise NotImplementedError(f"unexpected fx node kind {node.op!r} in an exported graph: {describe_graph_node(node)}")
        if node.name in written:
            space = _replicated_only(space)
        grads[space.name] = space.requires_grad
        spaces.append(space)
    if unsupported:
        warnings.warn(_unsupported_message(unsupported), UnsupportedOpWarning, stacklevel=3)
    return StrategySpace(mesh, tuple(spaces), tuple(unsupported))


def _unsupported_message(unsupported: Mapping[str, NodeSpace]) -> str:
    """The one warning about ops that run replicated: those without a rule, then those whose rule raised."""
    missing = [f"{op} (first: {node.describe()})" for op, node in unsupported.items() if not node.fallback_reason]
    failed = [f"{op} ({node.fallback_reason}; first: {node.describe()})" for op, node in unsupported.items() if node.fallback_reason]
    parts = [f"autotp has no sharding rule for {', '.join(missing)}"] if missing else []
    if failed:
        parts.append(f"autotp could not derive the strategies of {', '.join(failed)}")
    fix = " (a rule that raised should offer no strategy for calls it does not cover)" if failed else ""
    return (
        "; ".join(parts) + "; these ops run replicated (correct but slower). Register a rule with "
        f"autotp.strategies.rules.register to shard them{fix}."
    )


def _replicated_only(space: NodeSpace) -> NodeSpace:
    keep = [i for i, s in enumerate(space.strategies) if s.replicated]
    return replace(
        space, strategies=tuple(space.strategies[i] for i in keep),
        internal_comm=tuple(space.internal_comm[i] for i in keep) if space.internal_comm else (),
    )


def _placeholder_space(node: fx.Node, meta: OutputMeta | None, graph_input: GraphInput, mesh: MeshSpec, roles: Mapping[int, AxisRole]) -> NodeSpace:
    """User inputs arrive whole (``R``); state may be split along any dim each axis divides, as
    the axis's role allows (parameters only: buffers and constants are not what the roles are about)."""
    role = graph_input.role
    per_axis = []
    for axis, size in enumerate(mesh.shape):
        placements: list[Placement] = [R]
        if role is not InputRole.USER_INPUT and isinstance(meta, TensorMeta) and size > 1:
            placements += [Shard(d) for d in range(meta.ndim) if _fits(Shard(d), meta, size)]
        axis_role = roles.get(axis, AxisRole.ANY) if role is InputRole.PARAMETER else AxisRole.ANY
        if axis_role is AxisRole.DATA:
            placements = [R]
        elif axis_role is AxisRole.FSDP and len(placements) > 1:
            placements = placements[1:]
        per_axis.append([OpStrategy((), p) for p in placements])
    kind = NodeKind.USER_INPUT if role is InputRole.USER_INPUT else NodeKind.STATE
    trainable = role is InputRole.PARAMETER and isinstance(meta, TensorMeta) and meta.dtype.is_floating_point
    owner = graph_input.fqns[0].rpartition(".")[0] if graph_input.fqns else ""
    return NodeSpace(
        name=node.name, op="placeholder", module_path=owner, kind=kind, slots=(), slot_metas=(),
        output_meta=meta, strategies=combine_axes(per_axis, (meta,) if isinstance(meta, TensorMeta) else (), mesh.shape),
        requires_grad=trainable, is_parameter=role is InputRole.PARAMETER,
    )


def _output_space(node: fx.Node, metas: Mapping[str, OutputMeta | None], mesh: MeshSpec) -> NodeSpace:
    slots = [n for n in iter_node_args(node.args) if is_tensor_value(n)]
    slot_metas = tuple(metas[n.name] for n in slots)
    return NodeSpace(
        name=node.name, op="output", module_path="", kind=NodeKind.OUTPUT,
        slots=tuple(ValueRef(n.name) for n in slots), slot_metas=slot_metas,  # type: ignore[arg-type]
        output_meta=None, strategies=combine_axes([[OpStrategy((R,) * len(slots), R)]] * mesh.ndim, (), mesh.shape),
    )


def _op_space(node: fx.Node, meta: OutputMeta | None, metas: Mapping[str, OutputMeta | None], mesh: MeshSpec, known_calls: dict[Hashable, NodeSpace]) -> NodeSpace:
    """``node``'s space; a call seen before (``known_calls``, by ``_call_key``) reuses its strategies.

    The 32 layers of a LLaMA make the same few hundred calls 32 times over: asking the rules once
    per distinct call makes the strategy space of a 70B graph 3x faster.
    """
    rule = lookup(node.target)
    if node.target is operator.getitem and not isinstance(metas[cast("fx.Node", node.args[0]).name], tuple):
        # an item of an output with non-tensor members (histogramdd's list of bin edges): its
        # producer runs replicated (no meta to split by), and so does this lookup into it
        item = _call_space(node, None, (), meta, mesh)
        return replace(item, name=node.name, fallback=False, module_path=module_path(node), source=source_line(node.meta.get("stack_trace")))
    if node.target is operator.getitem:
        producer, index = cast("tuple[fx.Node, int]", node.args)
        slots: tuple[ValueRef, ...] = (ValueRef(producer.name, index),)
        slot_metas: tuple[TensorMeta, ...] = (metas[producer.name][index],)  # type: ignore[index]
    else:
        nodes = slot_nodes(node, rule)
        slots = tuple(ValueRef(n.name) for n in nodes)
        slot_metas = tuple(metas[n.name] for n in nodes)  # type: ignore[misc]  # a tuple or None sends the op to the fallback
    key = _call_key(node, meta)
    call = known_calls.get(key) if key is not None else None
    if call is None:
        call = _call_space(node, rule, slot_metas, meta, mesh)
        if key is not None:
            known_calls[key] = call
    return replace(call, name=node.name, module_path=module_path(node), slots=slots, source=source_line(node.meta.get("stack_trace")))


def _call_key(node: fx.Node, meta: OutputMeta | None) -> Hashable | None:
    """All a rule can see of ``node`` (``OpContext``): its target, its arguments with every
    ``fx.Node`` replaced by the meta of its value, and its output meta; ``None`` when an argument
    is not hashable (the call is then not shared)."""
    def arg_key(arg: Any) -> Hashable:
        if isinstance(arg, fx.Node):
            return ("node", output_meta(arg) if is_tensor_value(arg) else repr(arg.meta.get("val")))
        if isinstance(arg, (list, tuple)):
            return (type(arg).__name__, *(arg_key(a) for a in arg))
        if isinstance(arg, dict):
            return ("dict", *((k, arg_key(v)) for k, v in arg.items()))
        return (type(arg), arg)  # the type too: 1 and 1.0 are equal keys but not the same argument

    key = (node.target, arg_key(node.args), arg_key(node.kwargs), meta)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _call_space(node: fx.Node, rule: Rule | None, slot_metas: tuple[TensorMeta, ...], meta: OutputMeta | None, mesh: MeshSpec) -> NodeSpace:
    """The strategies of one call (name, module path and slots are the caller's to fill in): the
    rule's answers for each axis size, combined across the mesh's axes (``combine_axes``)."""
    replicate = OpStrategy((R,) * len(slot_metas), _replicated_output(meta))
    fallback = rule is None or meta is None or any(isinstance(m, tuple) for m in slot_metas)
    answers: dict[int, list[OpStrategy]] = {}  # by axis size: the rule sees global metas and one axis
    failure = ""
    for size in mesh.shape:
        if size in answers:
            continue
        answers[size] = [replicate]
        if not fallback and size > 1:
            ctx = OpContext(node, size, slot_metas, meta)  # type: ignore[arg-type]
            try:
                offered = list(rule.strategies(ctx))  # type: ignore[union-attr]
            except _RULE_ERRORS as exc:  # a call outside the rule's forms: replicated, named in the warning
                failure = f"its rule {getattr(rule.strategies, '__qualname__', 'rule')} raised {type(exc).__name__}: {exc}"  # type: ignore[union-attr]
                break
            for s in offered:
                if s not in answers[size] and _strategy_fits(s, slot_metas, meta, size):
                    answers[size].append(s)
    if failure:
        answers = {size: [replicate] for size in mesh.shape}
    outs = meta if isinstance(meta, tuple) else (meta,) if meta is not None else ()
    strategies = combine_axes([answers[size] for size in mesh.shape], (*slot_metas, *outs), mesh.shape, _combinable(node, rule, mesh.shape))
    op_name = str(node.target) if not callable(node.target) or op_schema(node.target) is not None else getattr(node.target, "__name__", str(node.target))
    internal_comm: tuple[tuple[tuple[str, int, int], ...], ...] = ()
    if rule is not None and rule.internal_collectives is not None and not failure:
        internal_comm = tuple(_internal_comm(rule, s, slot_metas, meta, mesh) for s in strategies)  # type: ignore[arg-type]
    return NodeSpace(
        name="", op=op_name, module_path="", kind=NodeKind.OP,
        slots=(), slot_metas=slot_metas, output_meta=meta, strategies=strategies,
        is_view=rule.view if rule is not None else False, fallback=rule is None or bool(failure),
        fallback_reason=failure, internal_comm=internal_comm,
    )


def _combinable(node: fx.Node, rule: Rule | None, mesh_shape: tuple[int, ...]) -> Callable[[tuple[OpStrategy, ...]], bool]:
    """Which per-axis combinations the rewriter can run: a local implementation (e.g. a
    vocab-parallel lookup) talks over one axis's group, and a call that draws random numbers
    splits its output over at most one axis (its draws come from that axis's per-rank stream,
    ``autotp.rewrite.random``). A seeded op whose arguments switch the draw off (attention with
    ``dropout_p=0``, eval-mode dropout) is not random here: batch on one axis and heads on another.
    A rule's own ``combinable`` has the last word (a conv's groups must divide by the axes splitting them)."""
    random_op = draws_random(node.target, node.args, node.kwargs)

    def keep(axes: tuple[OpStrategy, ...]) -> bool:
        if rule is not None and rule.local_impl is not None and sum(rule.local_impl(a) is not None for a in axes) > 1:
            return False
        if rule is not None and rule.combinable is not None and not rule.combinable(node, axes, mesh_shape):
            return False
        return not (random_op and sum(any(isinstance(p, Shard) for p in a.outputs()) for a in axes) > 1)

    return keep


def _internal_comm(rule: Rule, strategy: MeshStrategy, slot_metas: tuple[TensorMeta, ...], meta: OutputMeta, mesh: MeshSpec) -> tuple[tuple[str, int, int], ...]:
    """Collectives the local implementation runs, per axis, on the share the other axes leave a rank."""
    comm = []
    for axis, single in enumerate(strategy.axes):
        others = math.prod(size for a, size in enumerate(mesh.shape) if a != axis and strategy.divides_output(a))
        comm += [(kind, nbytes // others, axis) for kind, nbytes in rule.internal_collectives(single, slot_metas, meta)]  # type: ignore[misc]
    return tuple(comm)
