"""Hugging Face safetensors checkpoints: a lazy reader of parts of tensors, and a streaming writer.

``SafetensorsCheckpoint`` reads only the headers when opened; ``read`` then reads one part of one
tensor, so a rank loading its shard of a model never holds a whole file. ``SafetensorsWriter``
writes each file's header first (every shape and dtype is known in advance) and then each
tensor's bytes as they arrive, so ``autotp.save_pretrained`` holds one full tensor at a time where
``safetensors.torch.save_file`` needs a whole file's tensors in memory. Files are laid out as
Hugging Face's ``save_pretrained`` lays them out: ``model.safetensors``, or
``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from autotp.errors import CheckpointError, ConfigError
from autotp.ir.units import fmt_nbytes

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# The safetensors dtype names torch can hold (safetensors also names 4- and 6-bit floats torch lacks).
DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
})
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]  # what the writer is told in advance: name, shape, dtype


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """One tensor of a checkpoint as its file's header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path  # the .safetensors file that holds it


class SafetensorsCheckpoint:
    """A Hugging Face safetensors checkpoint: a .safetensors file, or a directory with
    model.safetensors, or sharded with a *.safetensors.index.json (as save_pretrained writes).

    Opening reads the headers only; ``read`` reads one part of one tensor.
    """

    def __init__(self, path: Path, tensors: Mapping[str, StoredTensor]) -> None:
        self.path = path
        self.tensors = tensors

    @classmethod
    def open(cls, path: str | os.PathLike) -> SafetensorsCheckpoint:
        root = Path(path)
        if not root.exists():
            raise CheckpointError(f"checkpoint {root} does not exist; expected a .safetensors file or a directory of them (as Hugging Face's save_pretrained writes)")
        if root.is_dir():
            index = _index_file(root)
            if index is not None:
                tensors = _tensors_of_index(index)
            else:
                files = sorted(root.glob("*.safetensors"))
                if not files:
                    raise CheckpointError(_no_weights_message(root))
                tensors = _tensors_of_files(files)
        elif root.name.endswith(".safetensors.index.json"):
            tensors = _tensors_of_index(root)
        elif root.suffix == ".safetensors":
            tensors = _tensors_of_files([root])
        else:
            raise CheckpointError(f"{root} is not a safetensors checkpoint: expected a .safetensors file, a *.safetensors.index.json, or a directory holding them")
        return cls(root, MappingProxyType(tensors))

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """``tensor[index]`` (one slice per dim, step 1) in the stored dtype, reading only that part.

        The file is opened for this call alone: a column slice touches every page of a row-major
        tensor, and a map kept open over all tensors would count the whole file in the rank's memory.
        """
        stored = self.tensors.get(name)
        if stored is None:
            some = ", ".join(list(self.tensors)[:5])
            raise CheckpointError(
                f"tensor '{name}' is not in checkpoint {self.path} (it holds {len(self.tensors)} tensors: {some}{' ...' if len(self.tensors) > 5 else ''}); "
                "check the model matches the checkpoint"
            )
        shape = _checked_shape(stored, index)
        if 0 in shape:
            return torch.empty(shape, dtype=stored.dtype)
        try:
            with safe_open(stored.file, framework="pt") as f:
                # A copy of the part alone: the slice views the whole tensor's memory map, which
                # would keep the file mapped and, once touched, the whole tensor resident.
                return f.get_slice(name)[index].clone(memory_format=torch.contiguous_format)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read {_describe_index(index)} of tensor '{name}' from {stored.file}: {e}; the file may have changed since the checkpoint was opened, re-download or re-save it") from e


def is_safetensors_checkpoint(path: str | os.PathLike) -> bool:
    """A *.safetensors file, or a directory holding *.safetensors or *.safetensors.index.json
    (a DCP checkpoint is a directory with a ``.metadata`` file and .distcp files instead)."""
    root = Path(path)
    if root.is_dir():
        return any(root.glob("*.safetensors")) or any(root.glob("*.safetensors.index.json"))
    return root.is_file() and (root.suffix == ".safetensors" or root.name.endswith(".safetensors.index.json"))


def _index_file(directory: Path) -> Path | None:
    """The directory's index: model.safetensors.index.json, else the only *.safetensors.index.json."""
    if (directory / INDEX_FILE).is_file():
        return directory / INDEX_FILE
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"checkpoint directory {directory} holds several indexes ({', '.join(p.name for p in indexes)}) and no {INDEX_FILE}; pass the path of the one to load")
    return indexes[0] if indexes else None


def _no_weights_message(directory: Path) -> str:
    entries = sorted(p.name for p in directory.iterdir())
    listing = ", ".join(entries[:10]) + (" ..." if len(entries) > 10 else "") if entries else "nothing"
    hint = " (a .metadata file: this looks like a torch.distributed.checkpoint (DCP) directory, which is loaded as such, not as safetensors)" if ".metadata" in entries else ""
    return (f"checkpoint directory {directory} holds no safetensors weights: it contains {listing}{hint}; expected {SINGLE_FILE}, "
            f"or model-*.safetensors shards with {INDEX_FILE} (as Hugging Face's save_pretrained writes); a DCP checkpoint is a directory with a .metadata file")


def _tensors_of_files(files: Sequence[Path]) -> dict[str, StoredTensor]:
    tensors: dict[str, StoredTensor] = {}
    for file in files:
        for name, stored in _read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"tensor '{name}' is in both {tensors[name].file} and {file}; a checkpoint without an index must hold each tensor once: remove the stray file or add a {INDEX_FILE}")
            tensors[name] = stored
    return tensors


def _tensors_of_index(index: Path) -> dict[str, StoredTensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map is not an object of tensor name -> file name")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the index {index}: {e!r}; expected JSON with a \"weight_map\" of tensor name -> .safetensors file, re-download or re-save the checkpoint") from e
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(name)
    headers: dict[str, dict[str, StoredTensor]] = {}
    for file_name, names in by_file.items():
        file = index.parent / file_name
        if not file.is_file():
            raise CheckpointError(f"the index {index} puts {len(names)} tensors (e.g. '{names[0]}') in {file}, which is missing; re-download the checkpoint or copy the file there")
        headers[file_name] = _read_header(file)
    tensors = {}
    for name, file_name in weight_map.items():  # the index's order
        stored = headers[file_name].get(name)
        if stored is None:
            raise CheckpointError(
                f"the index {index} puts tensor '{name}' in {index.parent / file_name}, but that file does not hold it; "
                "the index and the files are from different saves: re-download or re-save the checkpoint"
            )
        tensors[name] = stored
    return tensors


def _read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors ``file`` holds, from its header (safe_open maps the file but reads no data)."""
    try:
        with safe_open(file, framework="pt") as f:
            entries = [(name, f.get_slice(name)) for name in f.keys()]
            described = [(name, tuple(s.get_shape()), s.get_dtype()) for name, s in entries]
    except SafetensorError as e:
        raise CheckpointError(f"{file} is truncated or corrupt (safetensors: {e}); expected a complete safetensors file, re-download or re-save it") from e
    except OSError as e:
        raise CheckpointError(f"cannot open {file}: {e}") from e
    tensors = {}
    for name, shape, dtype_name in described:
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"tensor '{name}' in {file} has dtype {dtype_name}, which torch cannot hold; expected one of {', '.join(DTYPES)}: convert the checkpoint to one of them")
        tensors[name] = StoredTensor(name, shape, dtype, file)
    return tensors


def _checked_shape(stored: StoredTensor, index: tuple[slice, ...]) -> tuple[int, ...]:
    """The shape of ``index`` into ``stored``, which must be one in-bounds slice of step 1 per dim."""
    ok = len(index) == len(stored.shape) and all(
        isinstance(s, slice) and s.step in (None, 1) and isinstance(s.start, int) and isinstance(s.stop, int) and 0 <= s.start <= s.stop <= size
        for s, size in zip(index, stored.shape)
    )
    if not ok:
        raise CheckpointError(f"cannot read {_describe_index(index)} of tensor '{stored.name}' in {stored.file}: expected one slice(start, stop) per dim within its shape {list(stored.shape)}")
    return tuple(s.stop - s.start for s in index)


def _describe_index(index: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else repr(s) for s in index) + "]"


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: int  # which of the writer's files
    begin: int  # byte offsets in the file's data section
    end: int


class SafetensorsWriter:
    """Writes tensors to safetensors files one at a time, in the order of ``specs``.

    Files are split greedily in ``specs`` order at ``max_shard_size`` bytes (a tensor larger than
    that gets a file of its own). Within a file, tensors are laid out by element size, largest
    first (as safetensors does), so each one's data is aligned for a memory-mapped read.
    Use as a context manager: leaving it on an exception closes the open file, unfinished.
    """

    def __init__(self, directory: str | os.PathLike, specs: Sequence[TensorSpec], *, max_shard_size: int) -> None:
        if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
            raise ConfigError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
        self.directory = Path(directory)
        groups = _split(specs, max_shard_size)
        self.file_names = [SINGLE_FILE] if len(groups) == 1 else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
        position = {spec[0]: k for k, spec in enumerate(specs)}
        self._entries = sorted((entry for k, group in enumerate(groups) for entry in _layout(group, k)), key=lambda e: position[e.name])
        self._last_of_file = {e.file: k for k, e in enumerate(self._entries)}  # in specs order, files follow one another
        self._next = 0
        self._handle: io.BufferedWriter | None = None
        self._data_start = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in self.directory.iterdir():  # a previous save's files: stale shards would mislead a loader
            if old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(old.name):
                old.unlink()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of ``specs``: it must have the name, shape and dtype given there."""
        if self._next >= len(self._entries):
            raise CheckpointError(f"cannot write '{name}' to {self.directory}: all {len(self._entries)} tensors given to the writer are written")
        entry = self._entries[self._next]
        if name != entry.name or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise CheckpointError(
                f"cannot write tensor '{name}' ({list(tensor.shape)}, {tensor.dtype}) to {self.directory / self.file_names[entry.file]}: "
                f"expected '{entry.name}' ({list(entry.shape)}, {entry.dtype}) next, in the order and with the shapes and dtypes given to the writer"
            )
        if self._handle is None:
            self._open(entry.file)
        assert self._handle is not None
        if tensor.numel():
            self._handle.seek(self._data_start + entry.begin)
            self._handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy's stubs give ndarray the buffer protocol on Python >= 3.12 only
        self._next += 1
        if self._last_of_file[entry.file] == self._next - 1:
            self._finish_file(entry.file)

    def close(self) -> None:
        """Check every tensor was written; with several files, write the index."""
        if self._next < len(self._entries):
            missing = [e.name for e in self._entries[self._next:]]
            self.abort()
            raise CheckpointError(f"the checkpoint in {self.directory} is incomplete: {len(missing)} tensors were never written ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
        if not self._entries:  # no tensors: still a valid, empty file
            self._open(0)
            self._finish_file(0)
        if len(self.file_names) > 1:
            index = {
                "metadata": {"total_size": sum(e.end - e.begin for e in self._entries), "total_parameters": sum(_numel(e.shape) for e in self._entries)},
                "weight_map": {e.name: self.file_names[e.file] for e in self._entries},
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close the open file unfinished (the directory then holds an incomplete checkpoint)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self, file: int) -> None:
        entries = sorted((e for e in self._entries if e.file == file), key=lambda e: e.begin)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        header.update({e.name: {"dtype": _NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [e.begin, e.end]} for e in entries})
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._handle = open(self.directory / self.file_names[file], "wb")  # closed by _finish_file or abort
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._data_start = 8 + len(encoded)

    def _finish_file(self, file: int) -> None:
        assert self._handle is not None
        self._handle.close()
        self._handle = None
        size = sum(e.end - e.begin for e in self._entries if e.file == file)
        count = sum(1 for e in self._entries if e.file == file)
        logger.info("wrote %s: %d tensors, %s (file %d of %d)", self.directory / self.file_names[file], count, fmt_nbytes(size), file + 1, len(self.file_names))


def _split(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a file takes tensors until the next would take it past ``max_shard_size``."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    seen: set[str] = set()
    for name, shape, dtype in specs:
        if name in seen:
            raise CheckpointError(f"tensor '{name}' is given to the safetensors writer twice; each name is written once")
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor '{name}' of dtype {dtype}: safetensors holds {', '.join(str(d) for d in _NAMES)}; convert it first")
        seen.add(name)
        nbytes = _numel(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, tuple(shape), dtype))
        size += nbytes
    return groups


def _layout(group: Sequence[TensorSpec], file: int) -> list[_Entry]:
    """Byte offsets in one file: larger elements first (stable), so every tensor starts aligned."""
    entries, offset = [], 0
    for name, shape, dtype in sorted(group, key=lambda spec: -spec[2].itemsize):
        nbytes = _numel(shape) * dtype.itemsize
        entries.append(_Entry(name, shape, dtype, file, offset, offset + nbytes))
        offset += nbytes
    return entries


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
