"""Rank functions for the harness tests: module-level, so spawned ranks can import them."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def all_reduce_rank(rank: int, world_size: int) -> float:
    """Sum of 0..world_size-1 on every rank: proves the gloo group is wired up."""
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return value.item()


def gather_env(rank: int, world_size: int, scale: float, *, offset: float) -> dict[str, object]:
    """The environment a rank sees and a tensor result, to check args, kwargs and tensor return."""
    return {
        "env": {key: os.environ[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
        "group": (dist.get_rank(), dist.get_world_size()),
        "threads": torch.get_num_threads(),
        "tensor": torch.full((2, 3), rank * scale + offset),  # (2, 3)
    }


def return_lambda(rank: int, world_size: int) -> object:
    """A result plain pickle cannot carry back to the parent."""
    return lambda: rank


def raise_on_rank_1(rank: int, world_size: int) -> None:
    """Rank 1 raises while its peers block in a collective that can never complete."""
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.all_reduce(torch.zeros(1))


def sleep_on_rank_0(rank: int, world_size: int) -> None:
    """Rank 0 stalls while its peers wait in a barrier: a hang the deadline must catch."""
    if rank == 0:
        time.sleep(600)
    dist.barrier()


def exit_on_rank_1(rank: int, world_size: int) -> None:
    """Rank 1 dies without reporting, as a segfault would; its peers block in a collective."""
    if rank == 1:
        os._exit(3)
    dist.all_reduce(torch.zeros(1))
