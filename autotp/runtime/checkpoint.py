"""Checkpoints of sharded models: a full state dict for the original model, and DCP-ready shards.

``full_state_dict`` all-gathers every split tensor, so the original ``nn.Module`` loads the
result with ``load_state_dict``. ``sharded_state_dict`` wraps each local tensor in a ``DTensor``
that shares its memory, so ``torch.distributed.checkpoint`` saves only local shards and loads
(resharding as needed, e.g. saved on a (2, 2) mesh, loaded on 4 ranks of a 1-D one) straight into
the parameters. ``load_full_checkpoint`` reads such a checkpoint into the original, unsharded
model in one process, with no process group (DCP's ``no_dist`` load).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard

from autotp.comm.collectives import _all_gather
from autotp.ir.placement import R, Shard
from autotp.runtime.module import ShardedModule


def full_state_dict(sharded: ShardedModule) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on every rank (a collective: call it on all ranks)."""
    placements = sharded.placements()
    full = {}
    with torch.no_grad():
        for name, tensor in sharded.state_dict().items():
            value = tensor.detach()
            for axis, placement in reversed(list(enumerate(placements.get(name, ())))):
                if isinstance(placement, Shard):
                    value = _all_gather(value, placement.dim, sharded.group_names[axis])
            full[name] = value.contiguous() if value is not tensor.detach() else value.clone()
    return full


def sharded_state_dict(sharded: ShardedModule) -> dict[str, DTensor]:
    """DTensors over the sharded model's mesh, sharing memory with its parameters and buffers."""
    if sharded.mesh is None:
        raise ValueError("this sharded module has no device mesh (it was not built by autotp.parallelize)")
    placements = sharded.placements()
    shapes = sharded.global_shapes()
    out = {}
    for name, tensor in sharded.state_dict(keep_vars=True).items():
        spec = [DShard(p.dim) if isinstance(p, Shard) else DReplicate() for p in placements.get(name, (R,) * sharded.mesh.ndim)]
        shape = shapes.get(name, tensor.shape)  # given, not inferred: an uneven split (5 rows on 2 ranks) infers the wrong one
        out[name] = DTensor.from_local(tensor.detach(), sharded.mesh, spec, run_check=False, shape=shape, stride=_contiguous_strides(shape))
    return out


def load_full_checkpoint(model: nn.Module, checkpoint_id: str | os.PathLike) -> None:
    """Load a DCP checkpoint of a sharded model into the original ``model``, in one process.

    No process group is needed (DCP's ``no_dist`` load): every tensor is read whole from the
    shards of whatever mesh saved it, so a checkpoint of a (2, 2) mesh serves inference on one device.
    """
    state = model.state_dict()
    with warnings.catch_warnings():  # DCP warns that it assumes one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=checkpoint_id, no_dist=True)
    model.load_state_dict(state)


def _contiguous_strides(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def load_sharded_state_dict(sharded: ShardedModule, state: dict[str, DTensor]) -> None:
    """Copy loaded DTensors into the module (a no-op where they already share its memory)."""
    own = sharded.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(f"the state dict lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, target in own.items():
            local = state[name].to_local() if isinstance(state[name], DTensor) else state[name]
            if local.data_ptr() != target.data_ptr():
                target.copy_(local)
    if dist.is_initialized():
        for axis in range(sharded.mesh.ndim if sharded.mesh is not None else 0):  # every axis's group in turn: all of the mesh
            dist.barrier(group=sharded.mesh.get_group(axis))  # type: ignore[union-attr]
