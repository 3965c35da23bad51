"""Tensor values as the data model names them: which node output (``ValueRef``), and its global
shape and dtype (``TensorMeta``), with the one text form plans and fingerprints write."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
