"""Ranks that hold the same part of a tensor hold the same values.

A replicated weight is read on every rank as if it were one tensor: ranks seeded differently, or
loading different files, would each compute with their own copy and the output would silently
mix them. ``parallelize`` checksums every part once (reading it, not copying it), gathers the
checksums over the set-up group and compares the ranks that hold the same slice of each tensor;
``check_replicas=False`` skips it for a model whose state takes too long to read.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from autotp.errors import PlanMismatchError
from autotp.ir.placement import Shard
from autotp.runtime.agreement import SetupGroup
from autotp.runtime.targets import StateTarget

_Part = tuple[tuple[int, int], ...]  # the slice of the full tensor a rank holds, per dim


def check_replicas(setup: SetupGroup, targets: Mapping[str, StateTarget], state: Mapping[str, torch.Tensor], *, mesh_shape: tuple[int, ...]) -> None:
    """``PlanMismatchError`` on every rank, naming the first tensor whose copies differ and the ranks.
    Only parts that more than one rank holds are read (a part split over every axis has no copy)."""
    def copy_count(target: StateTarget) -> int:
        return math.prod(size for size, p in zip(mesh_shape, target.shard.placements) if not isinstance(p, Shard))

    names = [name for name, target in targets.items() if name in state and copy_count(target) > 1]
    sums = torch.stack([_checksum(state[name]) for name in names]).cpu() if names else torch.zeros(0, 2, dtype=torch.int64)
    mine = {name: (_part(targets[name]), (int(a), int(b))) for name, (a, b) in zip(names, sums.tolist())}
    gathered = setup.all_gather(mine, step="comparing the replicated weights and buffers")
    for name in names:
        holders: dict[_Part, list[tuple[int, tuple[int, int]]]] = {}
        for rank, by_name in zip(setup.ranks, gathered):
            part, checksum = by_name[name]
            holders.setdefault(part, []).append((rank, checksum))
        for copies in holders.values():
            first_rank, first = copies[0]
            differ = [rank for rank, checksum in copies if checksum != first]
            if differ:
                raise PlanMismatchError(
                    f"'{name}' has different values on rank {first_rank} and rank{'s' if len(differ) > 1 else ''} "
                    f"{', '.join(map(str, differ))}, which the plan gives the same part of it ({targets[name].shard}): "
                    "each rank would compute with its own copy. Build the model with the same seed on every rank "
                    "(torch.manual_seed before constructing it) or load the same weights; pass check_replicas=False "
                    "to parallelize to skip this check"
                )


def _part(target: StateTarget) -> _Part:
    return tuple((s.start, s.stop) for s in target.shard.index)


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 sums of the tensor's bytes, read as 32-bit and as 16-bit words: equal bytes give
    equal sums, and the reduction accumulates in place (no working copy: a copy per tensor grows
    the resident set of a CPU rank by the allocator's retention). Overflow wraps alike on every rank."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    wide = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
    narrow = flat.view(torch.int16) if flat.numel() % 2 == 0 else flat
    return torch.stack([wide.sum(dtype=torch.int64), narrow.sum(dtype=torch.int64)])
