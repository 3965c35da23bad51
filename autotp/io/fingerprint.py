"""The fingerprint of the graph a plan was made for, and what differs when it does not match.

A plan is only meaningful for the graph it was solved on: the same nodes, ops, wiring and
tensor shapes, on the same mesh. The fingerprint is a SHA-256 over one line per node

    <name> <op> (<input values>) -> <dtype>[<shape>]

after a first line naming the mesh (``tp_size 4`` for a 1-D mesh, ``mesh_shape 2,4`` for an N-D
one; axis names do not count: they label the axes, the plan's placements follow the shape), so that a saved plan applied to another model (or the same model at
another batch size or width) is refused with a message naming the first node that differs.

Layout-only ops (``contiguous``) are left out, their readers pointed at their input: whether
``torch.export`` records one depends on the strides the capture device's kernels return (the
meta device's attention returns a contiguous tensor, CPU's a transposed one, so
``y.transpose(1, 2).contiguous()`` keeps a node on meta and none on CPU). A plan made on the
meta device must still fit the real model; ``autotp.io.plan_align`` fills those nodes in.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotp.ir.values import format_value
from autotp.strategies.engine import NodeSpace, StrategySpace

if TYPE_CHECKING:
    from autotp.ir.plan import Plan

FINGERPRINT_PREFIX = "sha256:"

# Ops that change strides only: the value, shape and dtype pass through unchanged.
LAYOUT_ONLY_OPS = frozenset({"aten.contiguous.default"})


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """What the fingerprint sees of one node."""

    name: str
    op: str
    inputs: tuple[str, ...]
    value: str

    def line(self) -> str:
        return f"{self.name} {self.op} ({', '.join(self.inputs)}) -> {self.value}"


def node_entry(node: NodeSpace) -> NodeEntry:
    return NodeEntry(node.name, node.op, tuple(str(ref) for ref in node.slots), format_value(node.output_meta))


def canonical_entries(entries: Sequence[NodeEntry]) -> list[NodeEntry]:
    """``entries`` without layout-only ops, each reader pointed at the op's own input."""
    alias: dict[str, str] = {}
    out = []
    for entry in entries:
        inputs = tuple(alias.get(ref, ref) for ref in entry.inputs)
        if entry.op in LAYOUT_ONLY_OPS and len(inputs) == 1:
            alias[entry.name] = inputs[0]
            continue
        out.append(NodeEntry(entry.name, entry.op, inputs, entry.value))
    return out


def graph_fingerprint(entries: Sequence[NodeEntry], mesh_shape: int | Sequence[int]) -> str:
    """The fingerprint of a graph's ``entries`` on a mesh of ``mesh_shape`` (an int: 1-D)."""
    shape = (mesh_shape,) if isinstance(mesh_shape, int) else tuple(mesh_shape)
    head = f"tp_size {shape[0]}" if len(shape) == 1 else "mesh_shape " + ",".join(str(s) for s in shape)
    digest = hashlib.sha256(f"{head}\n".encode())
    for entry in canonical_entries(entries):
        digest.update(entry.line().encode())
        digest.update(b"\n")
    return FINGERPRINT_PREFIX + digest.hexdigest()


def space_fingerprint(space: StrategySpace) -> str:
    return graph_fingerprint([node_entry(n) for n in space.nodes], space.mesh.shape)


def plan_entries(plan: Plan) -> list[NodeEntry]:
    return [NodeEntry(n.name, n.op, tuple(str(ref) for ref in n.inputs), format_value(n.output_meta)) for n in plan.nodes]


def first_difference(
    ours: Sequence[NodeEntry], theirs: Sequence[NodeEntry], *, shapes: bool = True,
) -> tuple[int, NodeEntry | None, NodeEntry | None, int, int] | None:
    """Where two graphs' canonical node lists first differ (name, op, inputs and, with ``shapes``,
    output values): (position, our entry, their entry, our count, their count), an entry ``None``
    past the end of its list; ``None`` when they match."""
    ours, theirs = canonical_entries(ours), canonical_entries(theirs)

    def key(entry: NodeEntry) -> tuple:
        return (entry.name, entry.op, entry.inputs) + ((entry.value,) if shapes else ())

    for k, (mine, other) in enumerate(zip(ours, theirs)):
        if key(mine) != key(other):
            return k, mine, other, len(ours), len(theirs)
    if len(ours) != len(theirs):
        k = min(len(ours), len(theirs))
        return k, ours[k] if k < len(ours) else None, theirs[k] if k < len(theirs) else None, len(ours), len(theirs)
    return None


def describe_mismatch(plan: Plan, space: StrategySpace) -> str | None:
    """``None`` when ``plan`` was made for ``space``'s graph; else one line saying what differs."""
    if not plan.fingerprint or plan.fingerprint == space_fingerprint(space):
        return None
    if tuple(plan.mesh_shape) != space.mesh.shape:
        if len(plan.mesh_shape) == 1 and space.mesh.ndim == 1:
            return f"the plan was made for {plan.mesh_shape[0]} ranks but the mesh has {space.mesh.shape[0]}"
        return f"the plan was made for the mesh {plan.mesh} but the mesh is {space.mesh}"
    difference = first_difference(plan_entries(plan), [node_entry(n) for n in space.nodes])
    if difference is not None:
        k, mine, other, n_ours, n_theirs = difference
        if mine is not None and other is not None:
            return (
                f"the plan does not fit this model (graph fingerprint differs): op {k} is "
                f"'{mine.line()}' in the plan but '{other.line()}' in this model; "
                "re-plan for this model, or check that the model config and example input shapes match the ones planned for"
            )
        extra, where = (other, "this model") if other is not None else (mine, "the plan")
        return (
            f"the plan does not fit this model (graph fingerprint differs): the plan has {n_ours} nodes but "
            f"this model's graph has {n_theirs}; the first extra node, in {where}, is '{extra.line()}'"  # type: ignore[union-attr]
        )
    return (
        "the plan does not fit this model: its graph fingerprint differs although every node matches "
        "(the plan file was edited, or written by another autotp version); re-plan for this model"
    )
