"""Tensor values as the data model names them: which node output (``ValueRef``), and its global
shape and dtype (``TensorMeta``), with the one text form plans and fingerprints write."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from autotp.ir.placement import Placements, Shard


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Global shape and dtype of one tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def split_meta(meta: TensorMeta, placements: Placements, mesh_shape: tuple[int, ...], axes: Iterable[int]) -> TensorMeta:
    """``meta`` as it is left by the splits of ``placements`` on the given mesh ``axes`` only."""
    shape = list(meta.shape)
    for axis in axes:
        p = placements[axis]
        if isinstance(p, Shard):
            shape[p.dim] //= mesh_shape[axis]
    return TensorMeta(tuple(shape), meta.dtype)


@dataclass(frozen=True, slots=True)
class ValueRef:
    """A tensor value: output ``index`` of ``node`` (``None`` for single-output nodes)."""

    node: str
    index: int | None = None

    def __str__(self) -> str:
        return self.node if self.index is None else f"{self.node}[{self.index}]"


def format_value(meta: TensorMeta | tuple[TensorMeta, ...] | None) -> str:
    """``float32[8,1024,768]``; a multi-output op gives ``(float32[..], int64[..])``; none: ``""``."""
    if meta is None:
        return ""
    if isinstance(meta, tuple):
        return "(" + ", ".join(format_value(m) for m in meta) + ")"
    return f"{str(meta.dtype).removeprefix('torch.')}[{','.join(str(s) for s in meta.shape)}]"


def parse_value_ref(text: str) -> ValueRef:
    """The inverse of ``str(ValueRef)``: ``"linear"`` or ``"split[1]"``."""
    name, bracket, rest = text.rpartition("[")
    if bracket and rest.endswith("]") and rest[:-1].isdigit() and name:
        return ValueRef(name, int(rest[:-1]))
    return ValueRef(text)


def parse_value(text: str) -> TensorMeta | tuple[TensorMeta, ...] | None:
    """The inverse of ``format_value``; raises ``ValueError`` naming what it could not read."""
    if not text:
        return None
    if text.startswith("(") and text.endswith(")"):
        inner = text[1:-1]
        return tuple(_parse_meta(part if part.endswith("]") else part + "]") for part in inner.split("], ")) if inner else ()
    return _parse_meta(text)


def _parse_meta(text: str) -> TensorMeta:
    name, bracket, dims = text.partition("[")
    dtype = getattr(torch, name, None)
    if not bracket or not dims.endswith("]") or not isinstance(dtype, torch.dtype):
        raise ValueError(f"{text!r} is not a tensor value such as 'float32[8,1024]'")
    try:
        shape = tuple(int(d) for d in dims[:-1].split(",") if d)
    except ValueError:
        raise ValueError(f"{text!r} has a shape that is not a list of integers") from None
    return TensorMeta(shape, dtype)


def output_metas(meta: TensorMeta | tuple[TensorMeta, ...] | None) -> tuple[TensorMeta, ...]:
    """Every output's meta, in order (none for a node without a tensor output)."""
    if meta is None:
        return ()
    return meta if isinstance(meta, tuple) else (meta,)
