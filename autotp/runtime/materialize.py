"""Where each rank's parameters and buffers come from: the model's own tensors, a checkpoint, or an init.

``parallelize`` needs, for every parameter and buffer the sharded module holds, this rank's part
of it (``StateTarget``: its names, full shape, dtype and ``LocalShard``). A real tensor of the
model is sliced; a tensor on the meta device is read from ``weights=`` (only this rank's part) or,
without weights, initialised part by part (``autotp.runtime.shard_init``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from autotp.ir.placement import Placements, format_placements


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
