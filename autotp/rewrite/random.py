"""Random ops under tensor parallelism: one stream for replicated regions, one per rank for split ones.

Replicated regions (a dropout on an ``R`` tensor) must draw the *same* mask on every rank, so
they use PyTorch's global generator, which stays in step across ranks when every rank seeds it
alike (``torch.manual_seed``) and makes the same draws. Split regions (a dropout on an ``S(d)``
chunk) must draw *independent* masks per chunk, so they draw from a second, per-rank stream
seeded ``seed + 2718 + rank`` (Megatron-LM's model-parallel RNG tracker does the same), which
also keeps the global stream untouched and in step. The rewriter routes every op tagged
``torch.Tag.nondeterministic_seeded`` whose output is split through ``run_in_sharded_stream``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

SHARDED_SEED_OFFSET = 2718  # as in Megatron-LM's model_parallel_cuda_manual_seed


@dataclass
class _Stream:
    cpu_state: torch.Tensor
    cuda_states: dict[int, torch.Tensor]
    seed: int
    rank: int


_STREAMS: dict[str, _Stream] = {}


def seed_sharded_stream(group_name: str, *, rank: int, seed: int) -> None:
    """(Re)start the split-region stream of ``group_name`` on this rank."""
    generator = torch.Generator().manual_seed(seed + SHARDED_SEED_OFFSET + rank)
    _STREAMS[group_name] = _Stream(generator.get_state(), {}, seed + SHARDED_SEED_OFFSET + rank, rank)


def manual_seed(seed: int) -> None:
    """Seed both streams: the global one (same on every rank) and each rank's split-region one.

    Call it with the same ``seed`` on every rank.
    """
    torch.manual_seed(seed)
    for group_name, stream in list(_STREAMS.items()):
        seed_sharded_stream(group_name, rank=stream.rank, seed=seed)


@contextmanager
def _forked(stream: _Stream, device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        saved = torch.cuda.get_rng_state(index)
        if index not in stream.cuda_states:
            torch.cuda.manual_seed(stream.seed)
            stream.cuda_states[index] = torch.cuda.get_rng_state(index)
        torch.cuda.set_rng_state(stream.cuda_states[index], index)
        try:
            yield
        finally:
            stream.cuda_states[index] = torch.cuda.get_rng_state(index)
            torch.cuda.set_rng_state(saved, index)
    else:
        saved = torch.get_rng_state()
        torch.set_rng_state(stream.cpu_state)
        try:
            yield
        finally:
            stream.cpu_state = torch.get_rng_state()
            torch.set_rng_state(saved)


def run_in_sharded_stream(op: Any, group_name: str, *args: Any, **kwargs: Any) -> Any:
    """Run random ``op`` on a split region with this rank's own stream."""
    stream = _STREAMS.get(group_name)
    if stream is None:
        raise RuntimeError(f"no split-region random stream for process group {group_name!r}; call autotp.manual_seed")
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    with _forked(stream, device):
        return op(*args, **kwargs)
