"""The mesh a plan is for: axis sizes, names, and which axes' groups talk across nodes.

Ranks are laid out row-major, as ``init_device_mesh`` lays them out: the last axis is the
fastest-varying, so its groups are ranks ``0, 1, ...`` and an earlier axis's groups are
``prod(shape[a+1:])`` ranks apart. With a multi-node hardware profile (``devices_per_node``),
axis ``a`` is priced on the intra-node link when its groups fit in one node
(``shape[a] * prod(shape[a+1:]) <= devices_per_node``) and on the inter-node link otherwise;
``inter_node_axes`` overrides that for meshes whose ranks are not numbered node by node.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from autotp.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MeshSpec:
    """Sizes and names of the mesh axes, in the mesh's order."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    inter_node_axes: tuple[int, ...] | None = None  # None: decided by the profile's devices_per_node

    @classmethod
    def of(
        cls,
        shape: int | Sequence[int],
        names: Sequence[str] | None = None,
        *,
        inter_node_axes: Sequence[int | str] | None = None,
    ) -> MeshSpec:
        """A mesh of ``shape`` (an int is a 1-D mesh); axes are named ``names`` or ``axis0, axis1, ...``
        (``tp`` on a 1-D mesh). Raises ``ConfigError`` on a bad shape, name or axis."""
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if not dims or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in dims):
            raise ConfigError(f"mesh_shape must be a non-empty sequence of positive ints such as (4,) or (2, 4), got {shape!r}")
        if names is None:
            names = ("tp",) if len(dims) == 1 else tuple(f"axis{a}" for a in range(len(dims)))
        names = tuple(str(n) for n in names)
        if len(names) != len(dims) or len(set(names)) != len(names):
            raise ConfigError(f"mesh axis names {names} must be {len(dims)} distinct names, one per axis of the mesh shape {dims}")
        spec = cls(dims, names)
        if inter_node_axes is not None:
            spec = cls(dims, names, tuple(sorted({spec.axis_index(a) for a in inter_node_axes})))
        return spec

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """All ranks of the mesh."""
        return math.prod(self.shape)

    def axis_index(self, axis: int | str) -> int:
        """The index of ``axis`` given by index or name; ``ConfigError`` naming the axes when unknown."""
        if isinstance(axis, str):
            if axis in self.names:
                return self.names.index(axis)
        elif isinstance(axis, int) and -self.ndim <= axis < self.ndim:
            return axis % self.ndim
        raise ConfigError(f"no mesh axis {axis!r}: the mesh {self} has axes {', '.join(self.names)} (or indices 0..{self.ndim - 1})")

    def __str__(self) -> str:
        return "(" + ", ".join(f"{n}={s}" for n, s in zip(self.names, self.shape)) + ")"
