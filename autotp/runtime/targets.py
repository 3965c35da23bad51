"""What each rank holds of the model's state: every parameter and buffer, its names, full shape and part.

``parallelize`` builds one ``StateTarget`` per tensor the sharded module holds, from the captured
graph and the plan; loading (``autotp.runtime.materialize``) and initialising
(``autotp.runtime.shard_init``) fill this rank's part of each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autotp.capture.export import CapturedGraph, InputRole
from autotp.capture.torch_compat import non_persistent_buffer_names
from autotp.ir.placement import Placements, Replicate, chunk_index, format_placements
from autotp.ir.plan import Plan
from autotp.ir.values import TensorMeta


@dataclass(frozen=True, slots=True)
class LocalShard:
    """Where this rank's part of a tensor lies in the full one: its placement on each mesh axis,
    and one slice per dim (nested splits of a dim stay contiguous, ``autotp.ir.placement.chunk_index``)."""

    placements: Placements
    index: tuple[slice, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.index)

    def __str__(self) -> str:
        return format_placements(self.placements)


@dataclass(frozen=True, slots=True)
class StateTarget:
    """One parameter or buffer of the model, and the part of it this rank holds."""

    fqns: tuple[str, ...]  # every name of the tensor in the model (tied weights have several), the first is its name
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    shard: LocalShard

    @property
    def name(self) -> str:
        return self.fqns[0]


def state_targets(model: nn.Module, captured: CapturedGraph, plan: Plan, coordinate: tuple[int, ...]) -> dict[str, StateTarget]:
    """Every parameter and buffer the sharded module holds, by its first name: the graph's state
    inputs with their planned placements, then the tensors the graph never reads (kept whole)."""
    mesh_shape = tuple(plan.mesh_shape)
    by_node = {n.name: n for n in plan.nodes}
    targets: dict[str, StateTarget] = {}
    for gi in captured.inputs:
        if gi.role not in (InputRole.PARAMETER, InputRole.BUFFER):
            continue
        node = by_node[gi.node_name]
        meta = node.output_meta
        assert isinstance(meta, TensorMeta)  # a placeholder has one output
        placements = node.strategy.output
        targets[gi.fqns[0]] = StateTarget(gi.fqns, meta.shape, meta.dtype, LocalShard(placements, chunk_index(meta.shape, placements, mesh_shape, coordinate)))
    aliases = state_aliases(model)
    whole = (Replicate(),) * len(mesh_shape)
    for fqn in captured.unused_fqns:
        names = aliases[fqn]
        if names[0] in targets:
            continue
        tensor = get_state(model, fqn)
        targets[names[0]] = StateTarget(names, tuple(tensor.shape), tensor.dtype, LocalShard(whole, tuple(slice(0, s) for s in tensor.shape)))
    return targets


def state_aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every name of every parameter and buffer -> all names of the same tensor, in the model's order."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(tensor), []).append(name)
    return {name: tuple(names) for names in by_id.values() for name in names}


def get_state(model: nn.Module, fqn: str) -> torch.Tensor:
    owner, _, name = fqn.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, name)


def non_persistent_names(model: nn.Module) -> set[str]:
    """Every name of the model's buffers registered with ``persistent=False`` (never in a state dict or checkpoint)."""
    return {f"{path}.{name}".lstrip(".") for path, module in model.named_modules(remove_duplicate=False) for name in non_persistent_buffer_names(module)}
