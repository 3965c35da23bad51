"""Hand layouts expressed as pinned strategies, so the ILP prices them under the same model.

``megatron_layout_of`` finds Megatron-LM's layout (Shoeybi et al. 2019, section 3) in the
captured graph, by structure rather than by module names: around each attention core
(``scaled_dot_product_attention``, or ``softmax(Q @ K^T) @ V``) the linears that produce its
q, k and v are column-parallel (weight split on output features, output ``S(-1)``: whole heads
per rank) and the one linear that consumes its output is row-parallel (weight split on input
features, output ``P``, all-reduced once); in each MLP the linears whose outputs are joined by
pointwise ops only (an activation, a gate multiply) are column-parallel and the linear they feed
is row-parallel. Embeddings and the output head are left to the solver, as before.

A fused q/k/v projection (Hugging Face GPT-2's ``c_attn``: q, k and v are thirds of one
``(C, 3C)`` weight) is not pinned: Megatron splits it per head, taking a slice of each third,
and a contiguous ``Shard`` of its output would instead give rank 0 all of q and part of k. The
layout says so in its ``notes``.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from autotp.capture.torch_compat import OpOverload
from autotp.errors import AutoTPError
from autotp.ir.placement import P, R, Shard
from autotp.ir.strategy import MeshStrategy
from autotp.ir.values import ValueRef
from autotp.strategies.blocks import block_of, block_pattern, split_block_path
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace
from autotp.strategies.op_facts import packet_name


@dataclass(frozen=True, slots=True)
class _Weighted:
    """Where a contraction against a weight keeps its operands: ``x @ W`` or ``x @ W.T``."""

    activation_slot: int
    weight_slot: int
    out_dim: int  # the weight dim of output features (split: column parallel)
    in_dim: int  # the weight dim of input features (split: row parallel)


# linear(x, W[n, k], b); addmm(b, x, W[k, n]) is Hugging Face's Conv1D; mm/matmul(x, W[k, n])
_WEIGHTED = {
    "aten.linear": _Weighted(0, 1, 0, 1),
    "aten.addmm": _Weighted(1, 2, 1, 0),
    "aten.mm": _Weighted(0, 1, 1, 0),
    "aten.matmul": _Weighted(0, 1, 1, 0),
}
# not tagged pointwise, but elementwise for the value they carry
_ELEMENTWISE = {"aten.dropout", "aten.to", "aten._to_copy", "aten.type_as", "aten.contiguous", "aten.alias", "aten.detach"}
# move or regroup elements without mixing them: between a projection and the attention core
_REGROUPING = {
    "aten.cat", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.stack",
    "aten.expand", "aten.repeat", "aten.repeat_interleave", "getitem",
}


@dataclass(frozen=True, slots=True)
class MegatronLayout:
    """Megatron-LM's column/row pins found in a graph; ``notes`` say what could not be pinned and why."""

    pins: Mapping[str, MeshStrategy]
    column: tuple[str, ...]  # node names, graph order
    row: tuple[str, ...]
    n_attention: int
    n_mlp: int
    notes: tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return self.n_attention + self.n_mlp > 0

    def describe(self, space: StrategySpace) -> str:
        """``14 linears pinned by graph structure (2 attentions, 2 MLPs): model.layers.0-1: column q_proj, …; row o_proj, …``."""
        head = f"{len(self.pins)} linears pinned by graph structure ({self.n_attention} attentions, {self.n_mlp} MLPs)"
        groups = ", ".join(_describe_groups(space, self.column, self.row))
        return "; ".join([f"{head}: {groups}" if groups else head, *self.notes])


def _describe_groups(space: StrategySpace, column: tuple[str, ...], row: tuple[str, ...]) -> Iterator[str]:
    """One entry per run of blocks pinned alike: ``model.layers.0-1: column q_proj, k_proj; row o_proj``."""
    nodes = space.by_name()
    per_block: dict[tuple[str, int] | None, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for side, names in ((0, column), (1, row)):
        for name in names:
            path = nodes[name].module_path
            split = split_block_path(path)
            per_block[block_of(path)][side].append(split.within if split else path or name)
    runs: list[tuple[str, int, int, tuple]] = []
    for block, (cols, rows) in per_block.items():
        key = (tuple(cols), tuple(rows))
        if block is not None and runs and runs[-1][0] == block[0] and runs[-1][2] + 1 == block[1] and runs[-1][3] == key:
            runs[-1] = (block[0], runs[-1][1], block[1], key)
        else:
            runs.append((block[0], block[1], block[1], key) if block else ("", -1, -1, key))
    for group, first, last, (cols, rows) in runs:
        label = "" if first < 0 else f"{group}.{first}" if first == last else f"{group}.{first}-{last}"
        sides = "; ".join(part for part in (
            f"column {', '.join(cols)}" if cols else "", f"row {', '.join(rows)}" if rows else "",
        ) if part)
        yield f"{label}: {sides}" if label else sides


def megatron_layout_of(space: StrategySpace) -> MegatronLayout:
    """Megatron-LM's layout of the attentions and MLPs found in ``space``'s graph (see the module doc).

    Raises ``AutoTPError`` naming the linear when a found projection offers no column or row
    strategy (a feature count the mesh does not divide).
    """
    graph = _Graph(space)
    column: set[str] = set()
    row: set[str] = set()
    fused: set[str] = set()
    n_attention = n_mlp = 0
    for qkv, out in graph.attention_cores():
        producers = [graph.producers(ref) for ref in qkv]
        consumers = graph.consumers(out)
        if not all(producers) or len(consumers) != 1:
            continue  # not a projected attention: no Megatron split around it
        n_attention += 1
        shared = {name for name, count in Counter(p for ps in producers for p in set(ps)).items() if count > 1}
        fused |= shared
        column |= {p for ps in producers for p in ps} - shared
        row |= set(consumers)
    for name in graph.weighted_names():
        mlp_producers = graph.mlp_producers(name)
        if mlp_producers and not (column | row | fused) & {name, *mlp_producers}:
            n_mlp += 1
            column |= set(mlp_producers)
            row.add(name)
    pins = {
        name: graph.column_strategy(name) if name in column else graph.row_strategy(name)
        for name in sorted(column | row, key=graph.order.__getitem__)
    }
    notes = dict.fromkeys(
        f"{block_pattern(space.by_name()[name].module_path or name)} projects q, k and v with one fused weight: Megatron splits it "
        "per head, which no contiguous split of its output expresses, so it is left to the solver"
        for name in sorted(fused, key=graph.order.__getitem__)
    )
    return MegatronLayout(
        pins, tuple(n for n in pins if n in column), tuple(n for n in pins if n in row), n_attention, n_mlp, tuple(notes),
    )


def megatron_pins(space: StrategySpace) -> dict[str, MeshStrategy]:
    """The pins of ``megatron_layout_of(space)``: node name -> strategy, for ``solve(pinned=...)``."""
    return dict(megatron_layout_of(space).pins)


class _Graph:
    """The strategy space read as a graph: who feeds whom, and which ops are weighted contractions."""

    def __init__(self, space: StrategySpace) -> None:
        self.nodes = space.by_name()
        self.order = {n.name: i for i, n in enumerate(space.nodes)}
        self.users: dict[str, list[tuple[NodeSpace, int]]] = defaultdict(list)
        for node in space.nodes:
            for slot, ref in enumerate(node.slots):
                self.users[ref.node].append((node, slot))

    def weighted(self, node: NodeSpace) -> _Weighted | None:
        """The slots of a contraction against a trainable parameter; None for any other op."""
        facts = _WEIGHTED.get(packet_name(node.op))
        if facts is None or facts.weight_slot >= len(node.slots):
            return None
        weight = self.nodes.get(node.slots[facts.weight_slot].node)
        return facts if weight is not None and weight.is_parameter and node.slot_metas[facts.weight_slot].ndim == 2 else None

    def weighted_names(self) -> Iterator[str]:
        return (n for n in self.nodes if self.nodes[n].kind is NodeKind.OP and self.weighted(self.nodes[n]) is not None)

    def attention_cores(self) -> Iterator[tuple[tuple[ValueRef, ...], str]]:
        """``((q, k, v), output node)`` for each attention: sdpa, or softmax(Q @ K^T) @ V."""
        for node in self.nodes.values():
            packet = packet_name(node.op)
            if packet.startswith(("aten.scaled_dot_product", "aten._scaled_dot_product")) and len(node.slots) >= 3:
                yield node.slots[:3], node.name
            elif packet in ("aten.softmax", "aten._softmax"):
                scores = self._contractions(node.slots[0].node)
                weighted_sum = [(m, slot) for m, slot in self._forward_contractions(node.name) if slot == 0]
                if len(scores) == 1 and len(weighted_sum) == 1:
                    qk, (av, _) = self.nodes[scores[0]], weighted_sum[0]
                    yield (qk.slots[0], qk.slots[1], av.slots[1]), av.name

    def _contractions(self, start: str) -> list[str]:
        """Unweighted matmuls that ``start`` is computed from through elementwise ops (the scores of a softmax)."""
        _, frontier = self._region(start, through=_is_elementwise_or_view, backward=True, expand_start=False)
        return [n.name for n in frontier if _is_unweighted_matmul(n, self)]

    def _forward_contractions(self, start: str) -> list[tuple[NodeSpace, int]]:
        """Unweighted matmuls fed by ``start`` through elementwise ops, with the slot they take it in."""
        expanded, _ = self._region(start, through=_is_elementwise_or_view, backward=False, expand_start=True)
        return [(user, slot) for name in expanded for user, slot in self.users[name] if _is_unweighted_matmul(user, self)]

    def producers(self, ref: ValueRef) -> list[str]:
        """Weighted linears that ``ref`` is computed from through views, regrouping and elementwise ops (RoPE)."""
        _, frontier = self._region(ref.node, through=_is_regrouping, backward=True, expand_start=False)
        return [n.name for n in frontier if self.weighted(n) is not None]

    def consumers(self, start: str) -> list[str]:
        """Weighted linears that take ``start``'s value (through views and elementwise ops) as their activation."""
        expanded, _ = self._region(start, through=_is_regrouping, backward=False, expand_start=True)
        found: dict[str, None] = {}
        for name in expanded:
            for user, slot in self.users[name]:
                facts = self.weighted(user)
                if facts is not None and slot == facts.activation_slot:
                    found[user.name] = None
        return list(found)

    def mlp_producers(self, name: str) -> list[str]:
        """The linears feeding linear ``name`` through pointwise ops only, at least one not a view; [] if anything else feeds it."""
        facts = self._facts(name)
        expanded, frontier = self._region(
            self.nodes[name].slots[facts.activation_slot].node, through=_is_elementwise_or_view, backward=True, expand_start=False,
        )
        producers = [n.name for n in frontier if n.kind is NodeKind.OP and self.weighted(n) is not None]
        others = [n for n in frontier if n.kind is not NodeKind.STATE and n.name not in producers]  # a bias or scale is fine
        activated = any(not self.nodes[n].is_view for n in expanded)
        return sorted(producers, key=self.order.__getitem__) if producers and not others and activated else []

    def _region(
        self, start: str, *, through: Callable[[NodeSpace], bool], backward: bool, expand_start: bool,
    ) -> tuple[list[str], list[NodeSpace]]:
        """Ops reached from ``start`` that ``through`` lets the walk pass (expanded), and where it stopped (frontier).

        A weighted linear always stops the walk: it is the edge of an attention or MLP.
        """
        expanded: list[str] = []
        frontier: list[NodeSpace] = []
        seen: set[str] = set()
        stack = [start]
        while stack:
            node = self.nodes[stack.pop()]
            if node.name in seen:
                continue
            seen.add(node.name)
            passable = node.kind is NodeKind.OP and self.weighted(node) is None and (through(node) or (expand_start and node.name == start))
            if not passable:
                frontier.append(node)
                continue
            expanded.append(node.name)
            stack.extend([ref.node for ref in node.slots] if backward else [user.name for user, _ in self.users[node.name]])
        return expanded, frontier

    def column_strategy(self, name: str) -> MeshStrategy:
        """Weight split on output features, activation replicated: output split on its last dim
        (on the mesh's last axis, Megatron-LM's tensor-parallel one; ``R`` on the others)."""
        node, facts = self.nodes[name], self._facts(name)
        for s in self._tensor_parallel(node):
            tp = s.axis(-1 % s.ndim)
            if tp.inputs[facts.weight_slot] == Shard(facts.out_dim) and tp.inputs[facts.activation_slot] == R and isinstance(tp.output, Shard):
                return s
        raise self._no_split(node, "column-parallel (weight split on its output features)")

    def row_strategy(self, name: str) -> MeshStrategy:
        """Weight split on input features, activation split on its last dim: output a partial sum."""
        node, facts = self.nodes[name], self._facts(name)
        last = Shard(node.slot_metas[facts.activation_slot].ndim - 1)
        for s in self._tensor_parallel(node):
            tp = s.axis(-1 % s.ndim)
            if tp.inputs[facts.weight_slot] == Shard(facts.in_dim) and tp.inputs[facts.activation_slot] == last and tp.output == P:
                return s
        raise self._no_split(node, "row-parallel (weight split on its input features)")

    @staticmethod
    def _tensor_parallel(node: NodeSpace) -> Iterator[MeshStrategy]:
        """The strategies that are all-``R`` on every axis but the last."""
        return (s for s in node.strategies if all(p == R for ps in (*s.inputs, *s.outputs) for p in ps[:-1]))

    def _facts(self, name: str) -> _Weighted:
        facts = self.weighted(self.nodes[name])
        assert facts is not None  # pins are only made for weighted linears
        return facts

    @staticmethod
    def _no_split(node: NodeSpace, what: str) -> AutoTPError:
        shape = node.slot_metas[_WEIGHTED[packet_name(node.op)].weight_slot].shape
        return AutoTPError(
            f"Megatron-LM baseline: linear '{node.name}' ({node.module_path}, weight {tuple(shape)}) offers no {what} "
            "strategy on this mesh; its feature count must divide by the tensor-parallel size"
        )


def _is_unweighted_matmul(node: NodeSpace, graph: _Graph) -> bool:
    """``Q @ K^T`` or ``A @ V``: a matmul of two activations."""
    return packet_name(node.op) in ("aten.matmul", "aten.bmm") and graph.weighted(node) is None


def _is_elementwise_or_view(node: NodeSpace) -> bool:
    if node.is_view or packet_name(node.op) in _ELEMENTWISE:
        return True
    overload = _overload(node.op)
    return overload is not None and torch.Tag.pointwise in overload.tags


def _is_regrouping(node: NodeSpace) -> bool:
    return _is_elementwise_or_view(node) or packet_name(node.op) in _REGROUPING


def _overload(op: str) -> OpOverload | None:
    """``"aten.mul.Tensor"`` -> ``torch.ops.aten.mul.Tensor``; None for ``getitem`` and other namespaces."""
    parts = op.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        return None
    packet = getattr(torch.ops.aten, parts[1], None)
    return getattr(packet, parts[2], None) if packet is not None else None
