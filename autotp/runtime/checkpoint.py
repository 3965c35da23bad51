"""Checkpoints of sharded models: a full state dict for the original model, and DCP-ready shards.

``full_state_dict`` all-gathers every split tensor, so the original ``nn.Module`` loads the
result with ``load_state_dict``. ``sharded_state_dict`` wraps each local tensor in a ``DTensor``
that shares its memory, so ``torch.distributed.checkpoint`` saves only local shards and loads
(resharding as needed, e.g. saved on a (2, 2) mesh, loaded on 4 ranks of a 1-D one) straight into
the parameters. ``load_full_checkpoint`` reads such a checkpoint into the original, unsharded
model in one process, with no process group (DCP's ``no_dist`` load). ``save_pretrained`` writes
the full model as a Hugging Face safetensors checkpoint, one gathered tensor at a time.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard

from autotp.comm.collectives import _all_gather
from autotp.errors import CheckpointError, ConfigError
from autotp.io.dcp_checkpoint import METADATA_FILE, DcpCheckpoint, is_dcp_checkpoint
from autotp.io.hf_checkpoint import SafetensorsWriter, TensorSpec
from autotp.ir.placement import Placements, R, Shard, chunk_index
from autotp.ir.units import parse_nbytes
from autotp.runtime.module import ShardedModule

logger = logging.getLogger(__name__)


def full_state_dict(sharded: ShardedModule) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on every rank (a collective: call it on all ranks)."""
    _check_sharded(sharded, "full_state_dict")
    placements = sharded.placements()
    shapes = sharded.global_shapes()
    full = {}
    with torch.no_grad():
        for name, tensor in sharded.state_dict().items():
            split = placements.get(name, ())
            value = _gather_full(sharded, tensor, split, shapes.get(name, tuple(tensor.shape)))
            full[name] = value.contiguous() if any(isinstance(p, Shard) for p in split) else value.clone()  # never the module's own memory
    return full


def _gather_full(sharded: ShardedModule, tensor: torch.Tensor, placements: Placements, shape: Sequence[int]) -> torch.Tensor:
    """The whole of one tensor from this rank's part (a collective over the groups of the axes it is
    split on). Axes are gathered innermost first; ``torch.chunk``'s last parts may be short or
    empty, so each part is padded to the full chunk size, gathered, and the padding cut off."""
    value = tensor.detach()
    mesh_shape = tuple(sharded.plan.mesh_shape)
    for axis in reversed(range(len(placements))):
        placement = placements[axis]
        if not isinstance(placement, Shard):
            continue
        outer = chunk_index(shape, placements[:axis], mesh_shape[:axis], sharded.coordinate[:axis])[placement.dim]  # what this axis split
        length = outer.stop - outer.start
        step = -(-length // mesh_shape[axis])
        short = step - value.shape[placement.dim]
        if short:
            pad_shape = list(value.shape)
            pad_shape[placement.dim] = short
            value = torch.cat([value, value.new_zeros(pad_shape)], dim=placement.dim)
        value = _all_gather(value, placement.dim, sharded.group_names[axis]).narrow(placement.dim, 0, length)
    return value


class SavesPretrained(Protocol):
    """A Hugging Face config (or anything else) that writes itself into a directory."""

    def save_pretrained(self, save_directory: str, /) -> object: ...


def save_pretrained(
    sharded: ShardedModule,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    config: SavesPretrained | None = None,
) -> None:
    """Write the full model as Hugging Face's ``save_pretrained`` does (safetensors files, an index
    when there are several), so ``from_pretrained(directory)`` loads it unsharded.

    A collective: every rank of the mesh calls it. Tensors are gathered one at a time, in
    ``state_dict()`` order, and rank 0 of the mesh writes each as it arrives, so no rank holds more
    than one full tensor. Tied weights are written once, under their first name. ``dtype``
    converts floating tensors; ``config`` (e.g. ``model.config``) is saved beside the weights.
    Raises ``CheckpointError`` on every rank when rank 0 could not write (disk full, permissions).
    """
    _check_sharded(sharded, "save_pretrained")
    if sharded.mesh is None:
        raise ConfigError("save_pretrained needs the sharded module's device mesh; this one was not built by autotp.parallelize")
    try:
        shard_nbytes = parse_nbytes(max_shard_size)
    except ConfigError:
        shard_nbytes = None
    if shard_nbytes is None:
        raise ConfigError(f"max_shard_size must be a positive number of bytes or a string such as '5GB' or '500MiB', got {max_shard_size!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating dtype (it converts the floating tensors only), got {dtype}")
    if config is not None and not callable(getattr(config, "save_pretrained", None)):
        raise ConfigError(f"config must have a save_pretrained(directory) method (e.g. a transformers PretrainedConfig), got {type(config).__name__}")
    placements = sharded.placements()
    shapes = sharded.global_shapes()
    state = sharded.state_dict()
    first_names = {fqn: gi.fqns[0] for gi in sharded._captured_inputs for fqn in gi.fqns}
    specs: list[TensorSpec] = [
        (name, tuple(shapes.get(name, tensor.shape)), dtype if dtype is not None and tensor.dtype.is_floating_point else tensor.dtype)
        for name, tensor in state.items() if first_names.get(name, name) == name  # a tied weight once, under its first name
    ]
    writes = all(c == 0 for c in sharded.coordinate)
    writer: SafetensorsWriter | None = None
    error: Exception | None = None  # rank 0's; it keeps gathering after one, so no rank hangs in a collective
    if writes:
        try:
            writer = SafetensorsWriter(directory, specs, max_shard_size=shard_nbytes)
        except Exception as e:  # any failure of rank 0 must reach the other ranks, not leave them in a gather
            error = e
    with torch.no_grad():
        for name, shape, target in specs:
            full = _gather_full(sharded, state[name], placements.get(name, ()), shape)
            if writer is not None and error is None:
                try:
                    writer.write(name, full.to(target))
                except Exception as e:
                    error = e
                    writer.abort()
            del full
    if writer is not None and error is None:
        try:
            writer.close()
            if config is not None:
                config.save_pretrained(str(directory))
        except Exception as e:
            error = e
    failure = _rank0_outcome(sharded, f"{type(error).__name__}: {error}" if error is not None else "")
    if failure:
        raise CheckpointError(
            f"save_pretrained to {directory} failed on rank 0 of the mesh, which writes the files: {failure}; "
            "what is there is incomplete: fix the cause (disk space, permissions) and save again"
        ) from error
    if writes:
        logger.info("saved %d tensors to %s", len(specs), directory)


def _check_sharded(module: object, function: str) -> None:
    """A plain ``nn.Module`` has no plan or shards: say so, rather than fail on a missing attribute."""
    if not isinstance(module, ShardedModule):
        raise ConfigError(
            f"autotp.{function} expected the module autotp.parallelize returned, got {type(module).__name__}; "
            "pass the sharded module (for an unsharded model, its own state_dict() is already whole)"
        )


def _rank0_outcome(sharded: ShardedModule, message: str) -> str:
    """Rank 0's error message (``""``: it wrote everything), on every rank of the mesh: gathered
    along each axis in turn, so after the last one every rank has heard from rank 0."""
    assert sharded.mesh is not None
    for axis in range(sharded.mesh.ndim):
        group = sharded.mesh.get_group(axis)
        heard: list[str | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(heard, message, group=group)
        message = next((m for m in heard if m), "")
    return message


def sharded_state_dict(sharded: ShardedModule) -> dict[str, DTensor]:
    """DTensors over the sharded model's mesh, sharing memory with its parameters and buffers."""
    _check_sharded(sharded, "sharded_state_dict")
    if sharded.mesh is None:
        raise ConfigError("sharded_state_dict needs the sharded module's device mesh; this one was not built by autotp.parallelize")
    placements = sharded.placements()
    shapes = sharded.global_shapes()
    return {
        name: as_dtensor(tensor.detach(), placements.get(name, (R,) * sharded.mesh.ndim), shapes.get(name, tuple(tensor.shape)), sharded.mesh)
        for name, tensor in sharded.state_dict(keep_vars=True).items()
    }


def as_dtensor(local: torch.Tensor, placements: Placements, shape: Sequence[int], mesh: DeviceMesh) -> DTensor:
    """A DTensor over ``mesh`` sharing ``local``'s memory; the full ``shape`` is given, not inferred:
    an uneven split (5 rows on 2 ranks) infers the wrong one."""
    spec = [DShard(p.dim) if isinstance(p, Shard) else DReplicate() for p in placements]
    return DTensor.from_local(local, mesh, spec, run_check=False, shape=torch.Size(shape), stride=_contiguous_strides(tuple(shape)))


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


def load_sharded_state_dict(sharded: ShardedModule, state: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
    """Copy loaded DTensors into the module (a no-op where they already share its memory), or read
    the DCP checkpoint directory ``state`` straight into it (a collective: every rank calls it).

    A directory is checked against the module first, on every rank alike, so a checkpoint that
    lacks a tensor or holds it in another shape is one ``CheckpointError`` naming them, not DCP's
    per-rank traceback.
    """
    _check_sharded(sharded, "load_sharded_state_dict")
    if isinstance(state, (str, os.PathLike)):
        state = _read_dcp_checkpoint(sharded, state)
    own = sharded.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(
            f"the state dict given to load_sharded_state_dict lacks {len(missing)} of the module's tensors: {_listed(missing)}; "
            "pass the dict autotp.sharded_state_dict(sharded) returned after dcp.load filled it, or the checkpoint directory itself"
        )
    with torch.no_grad():
        for name, target in own.items():
            value = state[name]
            local = value.to_local() if isinstance(value, DTensor) else value
            if local.data_ptr() != target.data_ptr():
                target.copy_(local)
    if dist.is_initialized():
        for axis in range(sharded.mesh.ndim if sharded.mesh is not None else 0):  # every axis's group in turn: all of the mesh
            dist.barrier(group=sharded.mesh.get_group(axis))  # type: ignore[union-attr]


def _read_dcp_checkpoint(sharded: ShardedModule, path: str | os.PathLike) -> dict[str, DTensor]:
    """The module's DTensors filled by DCP from ``path``, once its metadata is checked against them."""
    if not is_dcp_checkpoint(path):
        raise CheckpointError(f"{os.fspath(path)!r} is not a DCP checkpoint directory (it has no {METADATA_FILE} file): pass the checkpoint_id dcp.save wrote")
    checkpoint = DcpCheckpoint.open(path)
    state = sharded_state_dict(sharded)
    missing = sorted(set(state) - set(checkpoint.tensors))
    if missing:
        raise CheckpointError(
            f"the DCP checkpoint {checkpoint.path} lacks {len(missing)} of the module's tensors: {_listed(missing)}; "
            "load a checkpoint saved from this model (dcp.save(autotp.sharded_state_dict(sharded), checkpoint_id=...))"
        )
    reshaped = [f"'{n}' is {list(checkpoint.tensors[n].shape)} there, {list(t.shape)} here" for n, t in state.items() if tuple(checkpoint.tensors[n].shape) != tuple(t.shape)]
    if reshaped:
        raise CheckpointError(f"the DCP checkpoint {checkpoint.path} does not fit the module: {'; '.join(reshaped[:8])}; load a checkpoint saved from this model and config")
    mesh = sharded.mesh
    checkpoint.read_into(state, process_group=mesh.get_group(0) if mesh is not None and mesh.ndim == 1 else None)
    return state


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
