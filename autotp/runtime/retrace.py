"""Run a sharded module at input sizes other than the example's, along the dims declared dynamic.

The captured graph has the example's sizes baked into every shape argument, so another batch size
or sequence length needs another graph. Each rank re-captures the model's meta-device skeleton at
the new sizes, carries the plan over node by node (each strategy must still be a candidate there:
a split dim must still divide as the plan needs) and rewrites it, deterministically, so every
rank builds the same graph without talking to the others. Graphs are kept per size.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict

import torch
from torch import fx, nn

from autotp.capture.export import CapturedGraph, capture
from autotp.capture.torch_compat import pytree
from autotp.errors import InputMismatchError, PlanMismatchError
from autotp.io.fingerprint import first_difference, node_entry, plan_entries
from autotp.io.plan_align import carry_plan
from autotp.ir.plan import Plan
from autotp.rewrite.rewriter import rewrite
from autotp.runtime.arguments import PlannedCall, Shapes
from autotp.strategies.engine import StrategySpace, build_strategy_space

log = logging.getLogger(__name__)

MAX_GRAPHS = 8  # rank-local graphs kept, least recently used dropped first


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device: capturable, no memory.

    Tensors are swapped through ``deepcopy``'s memo, so their data is never copied and tied
    weights stay tied.
    """
    memo: dict[int, object] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


class Retracer:
    """This rank's graphs of one model and plan at the sizes it is called with."""

    def __init__(
        self,
        model: nn.Module,
        captured: CapturedGraph,
        plan: Plan,
        planned_call: PlannedCall,
        *,
        coordinate: tuple[int, ...],
        group_names: tuple[str, ...],
        device: torch.device | None,
        overlap: bool = True,
    ) -> None:
        self._overlap = overlap  # the rank-local graphs' schedule, as parallelize's
        self._skeleton = meta_skeleton(model)
        self._inputs = tuple((gi.node_name, gi.role, gi.fqns) for gi in captured.inputs)
        self._constant_shapes = {name: tuple(t.shape) for name, t in captured.constants.items()}
        self._plan = plan
        self._planned_call = planned_call
        self._coordinate = coordinate
        self._group_names = group_names
        self._device = device or torch.device("cpu")  # the skeleton's factory ops say "meta": run them here
        self._graphs: OrderedDict[Shapes, fx.GraphModule] = OrderedDict()

    def graph_for(self, shapes: Shapes) -> fx.GraphModule:
        graph = self._graphs.get(shapes)
        if graph is None:
            graph = self._build(shapes)
            self._graphs[shapes] = graph
            if len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(shapes)
        return graph

    def _build(self, shapes: Shapes) -> fx.GraphModule:
        started = time.perf_counter()
        sizes = self._describe(shapes)
        shape_iter = iter(shapes)
        leaves = [
            torch.empty(next(shape_iter), dtype=leaf.meta.dtype, device="meta") if leaf.meta is not None else leaf.value
            for leaf in self._planned_call.leaves
        ]
        captured = capture(self._skeleton, pytree.tree_unflatten(leaves, self._planned_call.spec))
        space = build_strategy_space(captured, self._plan.mesh)
        differs = self._differs(captured, space)
        if differs:
            raise InputMismatchError(f"{self._planned_call.model_name} at {sizes} {differs}; call it with the planned sizes, or parallelize it for these")
        try:
            plan = carry_plan(self._plan, space)
        except PlanMismatchError as exc:
            raise InputMismatchError(f"the plan does not fit {self._planned_call.model_name} at {sizes}: {exc}; call it with sizes the plan divides, or parallelize it for these") from None
        graph = rewrite(captured, space, plan, coordinate=self._coordinate, group_names=self._group_names, device=self._device, overlap=self._overlap)
        log.info("built the rank-local graph of %s at %s in %.2fs", self._planned_call.model_name, sizes, time.perf_counter() - started)
        return graph

    def _differs(self, captured: CapturedGraph, space: StrategySpace) -> str | None:
        """What makes the graph at new sizes more than a resized planned graph, or None."""
        if tuple((gi.node_name, gi.role, gi.fqns) for gi in captured.inputs) != self._inputs:
            return "captures a graph with other inputs than the planned one"
        for name, tensor in captured.constants.items():
            if tuple(tensor.shape) != self._constant_shapes.get(name):
                return f"captures the constant '{name}' with shape {tuple(tensor.shape)}, planned {self._constant_shapes.get(name)}"
        difference = first_difference(plan_entries(self._plan), [node_entry(n) for n in space.nodes], shapes=False)
        if difference is not None:
            _, mine, other, n_ours, n_theirs = difference
            if mine is not None and other is not None:
                return f"captures another graph than the planned one (op '{other.name}' ({other.op}) where the plan has '{mine.name}' ({mine.op})): its control flow depends on the sizes"
            return f"captures {n_theirs} ops where the planned graph has {n_ours}: its control flow depends on the sizes"
        return None

    def _describe(self, shapes: Shapes) -> str:
        tensors = [leaf for leaf in self._planned_call.leaves if leaf.meta is not None]
        return ", ".join(f"{leaf.name} {tuple(shape)}" for leaf, shape in zip(tensors, shapes))
