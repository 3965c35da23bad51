"""Find repeated identical blocks (``layers.0`` … ``layers.31``) so the ILP solves one of each.

A block is the set of nodes whose module path (or, for parameters, whose name) starts with
``<group>.<index>``. Two blocks of a group are identical when, node by node in graph order, they
have the same op, relative module path, shapes, candidate strategies, and the same wiring: each
input comes from the same position in the same block, from the same position in the previous
block, or from the same node outside. Block 0 usually differs from block 1 (its input comes
from the embedding, not from a block), so a 32-layer model has two distinct blocks, each solved
once, and the ILP no longer grows with depth.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass

from autotp.strategies.engine import NodeSpace, StrategySpace

_BLOCK = re.compile(r"^(?P<group>(?:[^.]+\.)*?[^.]+)\.(?P<index>\d+)(?=\.|$)")


@dataclass(frozen=True, slots=True)
class BlockPath:
    """A module path inside a repeated block: ``model.layers.3.mlp.up`` is group ``model.layers``,
    index 3, and ``mlp.up`` within the block (``""`` for the block itself)."""

    group: str
    index: int
    within: str

    @property
    def pattern(self) -> str:
        """The path in every block of the group: ``model.layers.*.mlp.up``."""
        return f"{self.group}.*" + (f".{self.within}" if self.within else "")


def split_block_path(path: str) -> BlockPath | None:
    """The block ``path`` lies in (its first numeric part), or ``None`` outside any block."""
    match = _BLOCK.match(path)
    if match is None:
        return None
    return BlockPath(match.group("group"), int(match.group("index")), path[match.end() + 1:])


def block_of(path: str) -> tuple[str, int] | None:
    """``"model.layers.3.mlp.up"`` -> ``("model.layers", 3)``; ``None`` outside any block."""
    block = split_block_path(path)
    return (block.group, block.index) if block else None


def block_pattern(path: str) -> str:
    """``transformer.h.3.attn.c_attn`` -> ``transformer.h.*.attn.c_attn``; a path outside blocks as is."""
    block = split_block_path(path)
    return block.pattern if block else path


def canonical_nodes(space: StrategySpace) -> dict[str, str]:
    """Map every node to the node that represents it in the ILP (itself unless in a repeat)."""
    blocks: dict[tuple[str, int], list[NodeSpace]] = defaultdict(list)
    for node in space.nodes:
        key = block_of(node.module_path)
        if key is not None:
            blocks[key].append(node)
    position = {n.name: (key, i) for key, nodes in blocks.items() for i, n in enumerate(nodes)}
    canonical = {n.name: n.name for n in space.nodes}
    first_with: dict[Hashable, list[NodeSpace]] = {}
    for (group, index), nodes in sorted(blocks.items()):
        signature = tuple(_node_signature(n, group, index, position) for n in nodes)
        representative = first_with.setdefault(signature, nodes)
        for node, rep in zip(nodes, representative):
            canonical[node.name] = rep.name
    return canonical


def _node_signature(node: NodeSpace, group: str, index: int, position: dict) -> Hashable:
    relative_path = node.module_path[len(f"{group}.{index}"):]
    wiring = []
    for ref in node.slots:
        where = position.get(ref.node)
        if where is not None and where[0] == (group, index):
            wiring.append(("same", where[1], ref.index))
        elif where is not None and where[0] == (group, index - 1):
            wiring.append(("previous", where[1], ref.index))
        else:
            wiring.append(("outside", ref.node, ref.index))
    return (
        node.op, node.kind, relative_path, node.output_meta, node.slot_metas, node.strategies,
        node.requires_grad, node.is_parameter, node.is_view, tuple(wiring),
    )
