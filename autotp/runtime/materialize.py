"""Where each rank's parameters and buffers come from: a checkpoint, the model's own tensors, or an init.

For every ``StateTarget`` (``autotp.runtime.targets``) this rank's part is read from ``weights=``
when the checkpoint holds the tensor (only that part is read); else cut from the model's tensor
when it is real; else, for a tensor on the meta device, initialised part by part
(``autotp.runtime.shard_init``). So a model built on the meta device never exists whole on any rank.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autotp.errors import CheckpointError
from autotp.io.dcp_checkpoint import DcpCheckpoint, is_dcp_checkpoint
from autotp.io.hf_checkpoint import SafetensorsCheckpoint, StoredTensor
from autotp.runtime.checkpoint import as_dtensor
from autotp.runtime.shard_init import InitFn, init_shards
from autotp.runtime.targets import StateTarget, get_state, non_persistent_names, state_aliases

Checkpoint = SafetensorsCheckpoint | DcpCheckpoint


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A DCP directory (it has a ``.metadata`` file), else a Hugging Face safetensors file or directory."""
    if not Path(path).exists():
        raise CheckpointError(f"weights={str(path)!r} does not exist: pass a safetensors file, a directory saved by save_pretrained, or a DCP checkpoint directory")
    return DcpCheckpoint.open(path) if is_dcp_checkpoint(path) else SafetensorsCheckpoint.open(path)


def check_checkpoint(model: nn.Module, checkpoint: Checkpoint, *, strict: bool, convert_dtypes: bool) -> None:
    """Raise one ``CheckpointError`` listing every way ``checkpoint`` does not fit ``model``.

    Run on each rank before any collective, from the model's own (meta) tensors: missing and (with
    ``strict``) unexpected tensors, as ``load_state_dict(strict=True)`` reports them; shapes; dtypes
    (a floating-point tensor of another width is converted only when ``convert_dtypes``).
    """
    stored = checkpoint.tensors
    missing: list[str] = []
    problems: list[str] = []
    known: set[str] = set()
    for names, tensor in _persistent_state(model):
        known.update(names)
        name = next((n for n in names if n in stored), None)
        if name is None:
            missing.append(names[0])
            continue
        entry = stored[name]
        if entry.shape != tuple(tensor.shape):
            problems.append(f"'{name}' in {_where(entry)} has shape {list(entry.shape)}, the model's is {list(tensor.shape)}")
        elif entry.dtype != tensor.dtype and not (convert_dtypes and entry.dtype.is_floating_point and tensor.dtype.is_floating_point):
            problems.append(
                f"'{name}' in {_where(entry)} is {_dtype(entry.dtype)}, the model's is {_dtype(tensor.dtype)}"
                + (" (pass dtype= to parallelize to convert floating-point tensors on load)" if entry.dtype.is_floating_point and tensor.dtype.is_floating_point else "")
            )
    unexpected = sorted(set(stored) - known - non_persistent_names(model)) if strict else []
    if strict and missing:
        problems.insert(0, f"missing {len(missing)}: {_listed(missing)}")
    if unexpected:
        problems.insert(int(bool(missing)), f"unexpected {len(unexpected)}: {_listed(unexpected)} (in {_where(stored[unexpected[0]])})")
    if problems:
        raise CheckpointError(
            f"the checkpoint {checkpoint.path} does not fit the model {type(model).__name__}: " + "; ".join(problems)
            + ". Load a checkpoint saved from this model and config"
            + (", or pass strict=False to parallelize to skip missing and unexpected tensors" if missing or unexpected else "")
        )


def local_parts(
    model: nn.Module, targets: Mapping[str, StateTarget], *, checkpoint: Checkpoint | None, init_fn: InitFn | None, device: torch.device | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's part of every target, by its name, each in memory of its own; and the parts a
    DCP checkpoint still has to fill (allocated, unread: ``read_dcp_parts`` is a collective).

    A tensor the checkpoint holds is read from it (only this rank's part); any other comes from
    the model when it is real, and is initialised part by part when it is on the meta device.
    """
    stored = checkpoint.tensors if checkpoint is not None else {}
    from_checkpoint = {name: t for name, t in targets.items() if any(n in stored for n in t.fqns)}
    rest = {name: get_state(model, name) for name in targets if name not in from_checkpoint}
    meta = [targets[name] for name, tensor in rest.items() if tensor.is_meta]
    state = {name: _owned(tensor.detach()[targets[name].shard.index], targets[name].dtype, device) for name, tensor in rest.items() if not tensor.is_meta}
    if meta:
        state.update(init_shards(model, meta, init_fn=init_fn, device=device))
    if isinstance(checkpoint, DcpCheckpoint):
        return state, {name: torch.empty(t.shard.shape, dtype=t.dtype, device=device) for name, t in from_checkpoint.items()}
    for name, t in from_checkpoint.items():
        assert isinstance(checkpoint, SafetensorsCheckpoint)
        state[name] = checkpoint.read(_stored_name(t, stored), t.shard.index).to(device=device, dtype=t.dtype)
    return state, {}


def read_dcp_parts(
    checkpoint: DcpCheckpoint, targets: Mapping[str, StateTarget], parts: Mapping[str, torch.Tensor], *, mesh: DeviceMesh, process_group: dist.ProcessGroup,
) -> None:
    """Fill ``parts`` from the DCP checkpoint: a collective of ``process_group`` (the mesh's ranks)."""
    checkpoint.read_into(
        {_stored_name(targets[name], checkpoint.tensors): as_dtensor(part, targets[name].shard.placements, targets[name].global_shape, mesh) for name, part in parts.items()},
        process_group=process_group,
    )


def _stored_name(target: StateTarget, stored: Mapping[str, StoredTensor]) -> str:
    """The name the checkpoint has the tensor under: a tied tensor may be stored under any of its names."""
    return next(n for n in target.fqns if n in stored)


def _owned(part: torch.Tensor, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """A copy in memory of its own, so the model's full tensor can be freed."""
    return part.to(device=device, dtype=dtype, copy=True)


def _persistent_state(model: nn.Module) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """(all names, tensor) of every parameter and persistent buffer, tied ones once: what a state dict holds."""
    aliases = state_aliases(model)
    non_persistent = non_persistent_names(model)
    seen: set[str] = set()
    out = []
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names = aliases[name]
        if names[0] in seen or name in non_persistent:
            continue
        seen.add(names[0])
        out.append((tuple(n for n in names if n not in non_persistent), tensor))
    return out


def _where(entry: StoredTensor) -> str:
    return str(entry.file)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
