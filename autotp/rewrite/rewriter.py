"""Stage 5: the rank-local graph: collectives where placements change, local shape arguments.

Walks the captured graph once and emits exactly the sites of ``autotp.comm.conversions.conversion_sites``
(the ones the plan lists and prices): a conversion with the steps of ``redistribute.transition``,
emitted at its first consumer and shared by the later ones, and ``grad_all_reduce`` (identity
forward) on an ``R`` input of an op that splits its work, whose gradient is a partial sum
(Megatron-LM's ``f``). Ops with shape arguments get them localised by their rule.

With ``overlap`` the graph runs the schedule of ``autotp.comm.overlap`` (the one the plan is
priced by): a hoisted conversion's first collective starts (``async_op=True``) right after the
later of its input's producer and the previous collective, and ``collectives.wait`` of it sits
where the blocking call would be, just before its first reader; the column-parallel linears of a
fused gradient sync run as one ``collectives.linears_with_grad_sync`` node at the first of them,
each reader an item of it.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from autotp.capture.export import CapturedGraph
from autotp.comm import collectives
from autotp.comm.conversions import ConversionSite, GradSyncSite, Site, SlotKey, conversion_sites
from autotp.comm.overlap import FUSED_CONTRACTIONS, overlap_schedule
from autotp.ir.placement import Shard
from autotp.ir.plan import Plan
from autotp.ir.strategy import MeshStrategy
from autotp.ir.values import ValueRef, split_meta
from autotp.rewrite import random
from autotp.strategies.engine import ASSERT_OPS, NodeSpace, StrategySpace, is_tensor_value
from autotp.strategies.op_facts import draws_random
from autotp.strategies.rules import LocalContext, OpStrategy, lookup
from autotp.strategies.rules.registry import OutputMeta, Rule

_COPIED_META = ("nn_module_stack", "stack_trace")

# A local chunk need not have the strides its global tensor had, so a view that was valid
# globally may not be locally; the graph never mutates, so reshape computes the same values.
_VIEW_AS_RESHAPE = {torch.ops.aten.view.default: torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default: torch.ops.aten.reshape.default}


def rewrite(
    captured: CapturedGraph,
    space: StrategySpace,
    plan: Plan,
    *,
    coordinate: Sequence[int],
    group_names: Sequence[str],
    device: torch.device | None = None,
    overlap: bool = True,
) -> fx.GraphModule:
    """The graph the rank at ``coordinate`` on the mesh runs (one index per axis; ``group_names``
    names each axis's process group it belongs to); placeholders take the rank-local state and the
    full inputs. ``overlap``: communicate beside computation (the module docstring); without it
    every collective blocks where its value is read."""
    nodes = {n.name: n for n in captured.graph_module.graph.nodes}
    emitter = _Emitter(space, plan, nodes, coordinate=tuple(coordinate), group_names=tuple(group_names), device=device, overlap=overlap)
    for node in nodes.values():
        emitter.emit(node)
    graph = emitter.graph
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="RankLocalGraph")


class _Emitter:
    def __init__(
        self, space: StrategySpace, plan: Plan, nodes: Mapping[str, fx.Node], *,
        coordinate: tuple[int, ...], group_names: tuple[str, ...], device: torch.device | None, overlap: bool,
    ) -> None:
        if len(coordinate) != space.mesh.ndim or len(group_names) != space.mesh.ndim:
            raise ValueError(f"a rank of the mesh {space.mesh} needs one coordinate and one group per axis, got {coordinate} and {group_names}")
        self.graph = fx.Graph()
        self.nodes = nodes
        self.spaces = space.by_name()
        self.strategies = {n.name: n.strategy for n in plan.nodes}
        self.mesh_shape = space.mesh.shape
        self.coordinate = coordinate
        self.group_names = group_names
        self.device = device
        self.env: dict[str, fx.Node] = {}
        self.items: dict[ValueRef, fx.Node] = {}
        self.sites_at: dict[SlotKey, list[Site]] = defaultdict(list)
        sites = conversion_sites(space, self.strategies, training=plan.training)
        for site in sites:
            for reader in site.readers:
                self.sites_at[reader].append(site)
        self.emitted: dict[Site, fx.Node] = {}
        self.schedule = overlap_schedule(space, sites, overlap=overlap)
        self.fused_at = {name: (site, i) for site, readers in self.schedule.weight_grads.items() for i, name in enumerate(readers)}
        self.fused: dict[GradSyncSite, fx.Node] = {}
        self.last_placeholder: fx.Node | None = None
        self.last_collective: fx.Node | None = None  # where the latest communicating conversion ends

    # --- values -------------------------------------------------------------------------------
    def raw(self, ref: ValueRef) -> fx.Node:
        if ref.index is None:
            return self.env[ref.node]
        if ref not in self.items:
            self.items[ref] = self.graph.call_function(operator.getitem, (self.env[ref.node], ref.index))
        return self.items[ref]

    def read(self, node: str, slot: int, ref: ValueRef) -> fx.Node:
        """Value ``ref`` as slot ``slot`` of ``node`` reads it: its sites there applied in order,
        each emitted once (at its first reader) and shared by the later ones."""
        value = self.raw(ref)
        for site in self.sites_at[(node, slot)]:
            if site not in self.emitted:
                if isinstance(site, GradSyncSite):
                    if site not in self.schedule.weight_grads:  # else the fused linears' backward syncs
                        for step in site.conjugate:
                            value = self.graph.call_function(collectives.grad_all_reduce, (value, self.group_names[step.axis]))
                else:
                    value = self.convert(site, value)
                self.emitted[site] = value
            value = self.emitted[site]
        return value

    def convert(self, site: ConversionSite, value: fx.Node) -> fx.Node:
        """The steps of ``site`` on ``value``; a hoisted first step starts early, waited for here."""
        steps = site.forward
        if self.schedule.hoisted(site):
            call, args = collectives.step_call(steps[0], value, self.group_names[steps[0].axis])
            with self.graph.inserting_after(self.start_after(value)):
                start = self.graph.call_function(call, args, {"async_op": True})
            value = self.graph.call_function(collectives.wait, (start,))
            self.last_collective = value
            steps = steps[1:]
        for step in steps:
            value = self.graph.call_function(*collectives.step_call(step, value, self.group_names[step.axis]))
            if step.kind.is_collective:
                self.last_collective = value
        return value

    def start_after(self, value: fx.Node) -> fx.Node:
        """The node a start of a collective on ``value`` goes after: the later of ``value``'s
        producer and the previous collective's end (one collective in flight), past the placeholders."""
        if value.target is operator.getitem and value in self.items.values():  # made lazily here: move it to its tuple
            value.args[0].append(value)  # type: ignore[union-attr]  # an item's first argument is its tuple's node
        candidates = [n for n in (value, self.last_collective, self.last_placeholder) if n is not None]
        return max(candidates)

    # --- nodes --------------------------------------------------------------------------------
    def emit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.env[node.name] = self.last_placeholder = self.graph.placeholder(node.name)
            return
        if node.op == "output":
            space = self.spaces[node.name]
            locals_ = iter([self.read(node.name, k, ref) for k, ref in enumerate(space.slots)])
            self.graph.output(_map_tensor_args(node.args[0], locals_, self.env))
            return
        if node.target in ASSERT_OPS:
            return
        if node.name in self.fused_at:
            self.emit_fused_linear(node)
            return
        space = self.spaces[node.name]
        strategy = self.strategies[node.name]
        inputs = [self.read(node.name, k, ref) for k, ref in enumerate(space.slots)]
        if node.target is operator.getitem and space.slots:  # without: an item of a non-tensor member, looked up below
            self.env[node.name] = inputs[0]
            return
        rule = lookup(node.target)
        target, args, kwargs = local_call(node, rule, space, strategy, inputs, self.env, coordinate=self.coordinate, mesh_shape=self.mesh_shape)
        if self.device is not None:  # factory ops and copies run where the rank runs (a meta model's graph says "meta")
            args = tuple(self.device if isinstance(a, torch.device) else a for a in args)
            kwargs = {**kwargs, "device": self.device} if "device" in kwargs else kwargs
        for axis, single in enumerate(strategy.axes):  # the engine lets at most one axis use a local implementation
            local_impl = rule.local_impl(single) if rule is not None and rule.local_impl is not None else None
            if local_impl is not None:
                target, kwargs = local_impl, {**kwargs, "group_name": self.group_names[axis]}
        split_axes = [a for a, single in enumerate(strategy.axes) if _splits_output(single)]
        if draws_random(node.target, node.args, node.kwargs) and split_axes:  # independent draws per chunk (one axis: the engine's rule)
            args, target = (target, self.group_names[split_axes[0]], *args), random.run_in_sharded_stream
        new = self.graph.create_node("call_function", target, args, kwargs, name=node.name)
        new.meta.update({k: node.meta[k] for k in _COPIED_META if k in node.meta})
        self.env[node.name] = new

    def emit_fused_linear(self, node: fx.Node) -> None:
        """``node``, a reader of a fused gradient sync, as its item of the one node that runs all the
        readers (emitted at the first of them, which their inputs are ready before)."""
        site, index = self.fused_at[node.name]
        if site not in self.fused:
            calls = [self.contraction_args(name) for name in self.schedule.weight_grads[site]]
            assert len({x for x, _ in calls}) == 1, f"the fused readers of {site.value} read different inputs"
            readers = tuple(reader for _, reader in calls)
            self.fused[site] = self.graph.call_function(collectives.linears_with_grad_sync, (calls[0][0], readers, self.group_names[site.axes[0]]))
        item = self.graph.create_node("call_function", operator.getitem, (self.fused[site], index), name=node.name)
        item.meta.update({k: node.meta[k] for k in _COPIED_META if k in node.meta})
        self.env[node.name] = item

    def contraction_args(self, name: str) -> tuple[Any, tuple[Any, ...]]:
        """The input of contraction ``name`` and its ``collectives.ContractionReader`` (kind, W, b,
        beta, alpha), as this rank calls it."""
        node, space = self.nodes[name], self.spaces[name]
        inputs = [self.read(name, k, ref) for k, ref in enumerate(space.slots)]
        _, args, kwargs = local_call(node, lookup(node.target), space, self.strategies[name], inputs, self.env, coordinate=self.coordinate, mesh_shape=self.mesh_shape)
        kind = FUSED_CONTRACTIONS[space.op].kind
        if kind == "linear":  # linear(x, W, b=None)
            return args[0], (kind, args[1], args[2] if len(args) > 2 else kwargs.get("bias"), 1.0, 1.0)
        if kind == "addmm":  # addmm(b, x, W, *, beta=1, alpha=1)
            return args[1], (kind, args[2], args[0], kwargs.get("beta", 1.0), kwargs.get("alpha", 1.0))
        return args[0], (kind, args[1], None, 1.0, 1.0)  # mm(x, W), matmul(x, W)


def _splits_output(strategy: OpStrategy) -> bool:
    return any(isinstance(p, Shard) for p in strategy.outputs())


def _map_tensor_args(args: Any, replacements: Iterator[Any], env: Mapping[str, Any]) -> Any:
    """Replace tensor fx.Nodes in ``args`` by ``replacements`` in ``iter_node_args`` order."""
    if isinstance(args, fx.Node):
        if is_tensor_value(args):
            return next(replacements)
        return env[args.name]
    if isinstance(args, (list, tuple)):
        return type(args)(_map_tensor_args(a, replacements, env) for a in args)
    if isinstance(args, dict):
        return {k: _map_tensor_args(v, replacements, env) for k, v in args.items()}
    return args


def local_call(
    node: fx.Node,
    rule: Rule | None,
    space: NodeSpace,
    strategy: MeshStrategy,
    inputs: Sequence[Any],
    env: Mapping[str, Any],
    *,
    coordinate: tuple[int, ...],
    mesh_shape: tuple[int, ...],
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """How the rank at ``coordinate`` calls ``node`` under ``strategy``: input slots replaced by
    ``inputs``, other nodes looked up in ``env``, shape arguments localised, views run as reshapes.
    The rewriter emits this call and the rule checker (``autotp.rewrite.rule_check``) runs it.

    Shape arguments are localised one axis at a time, in axis order: axis ``a``'s rule sees the
    tensors as the axes before it left them, as if the op ran on those shards (each tensor dim is
    split by one axis at most, so the order does not change the result)."""
    args, kwargs = _replace_slots(node, rule, iter(inputs), env)
    target = _VIEW_AS_RESHAPE.get(node.target, node.target)  # type: ignore[call-overload]  # any target may be looked up
    if rule is None or rule.localize is None:
        return target, args, kwargs
    done: list[int] = []  # axes already applied to the metas
    for axis, single in enumerate(strategy.axes):
        if _splits_output(single):
            lc = LocalContext(
                coordinate[axis], mesh_shape[axis], single,
                tuple(split_meta(m, p, mesh_shape, done) for m, p in zip(space.slot_metas, strategy.inputs)),
                _local_output_meta(space.output_meta, strategy, done, mesh_shape),  # type: ignore[arg-type]
            )
            args, kwargs = rule.localize(args, kwargs, lc)
            target = getattr(target, "overloadpacket", target)  # localised args may pick another overload
        done.append(axis)
    return target, args, kwargs


def _local_output_meta(meta: OutputMeta | None, strategy: MeshStrategy, axes: Sequence[int], mesh_shape: tuple[int, ...]) -> OutputMeta | None:
    if isinstance(meta, tuple):
        return tuple(split_meta(m, p, mesh_shape, axes) for m, p in zip(meta, strategy.outputs))
    return None if meta is None else split_meta(meta, strategy.outputs[0], mesh_shape, axes)


def _replace_slots(node: fx.Node, rule: Rule | None, replacements: Iterator[Any], env: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Args and kwargs of ``node`` with each input slot replaced, in ``slot_nodes`` order."""
    metadata = set(rule.metadata_args) if rule is not None else set()
    args = []
    for i, arg in enumerate(node.args):
        if i in metadata:
            args.append(fx.node.map_arg(arg, lambda n: env[n.name]))
        else:
            args.append(_map_tensor_args(arg, replacements, env))
    kwargs = _map_tensor_args(dict(node.kwargs), replacements, env)
    assert next(replacements, None) is None, f"slot count mismatch rewriting {node.name}"
    return tuple(args), kwargs


def collective_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of a rewritten graph that communicate in the forward pass."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in collectives.COLLECTIVE_FUNCTIONS]
