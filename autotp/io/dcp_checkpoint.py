"""A ``torch.distributed.checkpoint`` directory as a source of weights.

Its ``.metadata`` file lists every tensor's name, full shape and dtype, so a model can be checked
against it on each rank before any collective; the data is then read by DCP's own planner straight
into this rank's parts (DTensors over the mesh), whatever world size and layout saved it.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from autotp.errors import CheckpointError
from autotp.io.hf_checkpoint import StoredTensor

METADATA_FILE = ".metadata"


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path, METADATA_FILE).is_file()


@dataclass(frozen=True, slots=True)
class DcpCheckpoint:
    """The tensors a DCP checkpoint holds (read from its metadata only)."""

    path: Path
    tensors: Mapping[str, StoredTensor]

    @classmethod
    def open(cls, path: str | os.PathLike) -> DcpCheckpoint:
        path = Path(path)
        try:
            metadata = FileSystemReader(path).read_metadata()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read the DCP checkpoint metadata {path / METADATA_FILE}: {type(exc).__name__}: {exc}. "
                "The file is truncated or corrupt, or was written by another torch release: save the checkpoint again"
            ) from exc
        tensors = {
            name: StoredTensor(name, tuple(entry.size), entry.properties.dtype, path)
            for name, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)  # optimizer steps, RNG states etc. are bytes entries
        }
        return cls(path, MappingProxyType(tensors))

    def read_into(self, state: dict[str, DTensor], *, process_group: dist.ProcessGroup | None) -> None:
        """Fill each DTensor's local part: a collective of ``process_group`` (default: the world), whose every rank calls it."""
        try:
            dcp.load(state, checkpoint_id=self.path, process_group=process_group)
        except CheckpointException as exc:
            damaged = self._damaged_files()
            raise CheckpointError(
                f"reading the DCP checkpoint {self.path} failed: "
                + (f"{', '.join(damaged)}; " if damaged else "") + _first_failure(exc)
            ) from exc

    def _damaged_files(self) -> list[str]:
        """The data files that are missing or shorter than the metadata says (what a failed read most often means)."""
        ends: dict[str, int] = {}
        for info in FileSystemReader(self.path).read_metadata().storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        damaged = []
        for name, end in sorted(ends.items()):
            file = self.path / name
            if not file.is_file():
                damaged.append(f"{file} is missing")
            elif file.stat().st_size < end:
                damaged.append(f"{file} is truncated ({file.stat().st_size} bytes, the metadata needs {end})")
        return damaged


def _first_failure(exc: CheckpointException) -> str:
    """``rank N: Type: message`` of the first rank DCP reports, which names the file it could not read."""
    failures = getattr(exc, "failures", {}) or {}
    for rank, failure in sorted(failures.items()):
        error = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {type(error).__name__}: {error}. The checkpoint's data files are truncated, missing or corrupt: save it again"
    return str(exc)

