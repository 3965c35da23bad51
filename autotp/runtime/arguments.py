"""How a call of the sharded module maps onto the graph planned from ``example_inputs``.

``torch.export`` bakes every non-tensor argument and every tensor shape of the example into the
graph, and the sharded module runs that graph. So a call must bind to ``forward``'s parameters as
the original would (keywords included), pass the planned value of every Python scalar, and pass
tensors of the planned dtype and shape, except along the dims the user declared dynamic; anything
else is an ``InputMismatchError`` naming the argument, never a silently different answer.

    planned = PlannedCall.from_example(model.forward, (x, 3), dynamic_dims={"x": (0,)})
    leaves, shapes = planned.bind((x2,), {"n": 3})   # shapes is None when x2 has x's shape
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autotp.capture.export import tensor_meta
from autotp.capture.torch_compat import pytree
from autotp.errors import ConfigError, InputMismatchError
from autotp.ir.values import TensorMeta, format_value

Shapes = tuple[tuple[int, ...], ...]  # the shape of every tensor leaf, in leaf order


@dataclass(frozen=True, slots=True)
class PlannedLeaf:
    """One leaf of the example inputs: a tensor's meta and dynamic dims, or a baked-in value."""

    name: str  # as the user would write it: "x", "batch['input_ids']"
    meta: TensorMeta | None  # None for a non-tensor leaf
    value: Any = None  # the planned value of a non-tensor leaf
    dynamic_dims: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class PlannedCall:
    """The call the graph was captured for: ``forward``'s signature and the example's leaves."""

    model_name: str
    signature: inspect.Signature | None  # None when forward has no inspectable signature
    n_example: int  # len(example_inputs): they bind to forward's first positional parameters
    example_parameters: frozenset[str]  # the parameters those positions fill (not a *args)
    spec: pytree.TreeSpec
    leaves: tuple[PlannedLeaf, ...]

    @classmethod
    def from_example(
        cls,
        forward: Callable[..., Any],
        example_inputs: tuple[Any, ...],
        *,
        model_name: str,
        dynamic_dims: Mapping[str, Sequence[int]] | None = None,
    ) -> PlannedCall:
        signature = _signature(forward)
        names = _argument_names(signature, len(example_inputs))
        with_paths, spec = pytree.tree_flatten_with_path(tuple(example_inputs))
        declared = {name: _dims(name, dims) for name, dims in (dynamic_dims or {}).items()}
        leaves = []
        for path, value in with_paths:
            name = names[path[0].idx] + pytree.keystr(path[1:])  # type: ignore[attr-defined]  # a tuple's keys are SequenceKeys
            meta = tensor_meta(value)
            dims = declared.pop(name, frozenset())
            if dims and meta is None:
                raise ConfigError(f"dynamic_dims names '{name}', but that input of {model_name} is a {type(value).__name__}, not a tensor")
            if meta is not None:
                dims = frozenset(d % meta.ndim if -meta.ndim <= d < meta.ndim else _bad_dim(name, d, meta) for d in dims)
            leaves.append(PlannedLeaf(name, meta, None if meta is not None else value, dims))
        if declared:
            known = ", ".join(leaf.name for leaf in leaves if leaf.meta is not None)
            raise ConfigError(f"dynamic_dims names {', '.join(map(repr, declared))}, which is not a tensor input of {model_name}; its tensor inputs are: {known}")
        return cls(model_name, signature, len(example_inputs), frozenset(n for n in names if n.isidentifier()), spec, tuple(leaves))

    @property
    def has_dynamic_dims(self) -> bool:
        return any(leaf.dynamic_dims for leaf in self.leaves)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[list[Any], Shapes | None]:
        """The graph's user inputs for this call, in order, and the tensors' shapes where they
        differ from the planned ones (only along dynamic dims; otherwise this raises)."""
        values = self._positional(args, kwargs)
        flat, spec = pytree.tree_flatten(tuple(values))
        if spec != self.spec:
            raise InputMismatchError(
                f"{self.model_name} was called with inputs structured differently from example_inputs: "
                f"planned {self.spec}, given {spec}; pass inputs of the planned structure"
            )
        resized = False
        for leaf, value in zip(self.leaves, flat):
            resized |= self._check(leaf, value)
        if not resized:
            return flat, None
        return flat, tuple(tuple(value.shape) for leaf, value in zip(self.leaves, flat) if leaf.meta is not None)

    def _positional(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
        """The values bound to the example's positions; any other argument must be at its default."""
        if self.signature is None:
            if kwargs or len(args) != self.n_example:
                raise InputMismatchError(f"{self.model_name}'s forward has no inspectable signature; call the sharded module with {self.n_example} positional arguments, as in example_inputs")
            return list(args)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InputMismatchError(f"{self.model_name}.forward{self.signature} cannot take these arguments: {exc}") from None
        passed = dict(bound.arguments)
        bound.apply_defaults()
        positional = list(bound.args)
        if len(positional) < self.n_example:
            raise InputMismatchError(
                f"{self.model_name} was planned with {self.n_example} positional inputs but this call binds "
                f"{len(positional)}; pass every input that example_inputs had"
            )
        for name, value in passed.items():
            parameter = self.signature.parameters[name]
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                extra = len(positional) - self.n_example
                if extra > 0:
                    raise InputMismatchError(f"{self.model_name} was planned with {self.n_example} positional inputs, given {self.n_example + extra}; the graph has no place for the rest")
                continue
            if name not in self.example_parameters and not _is_default(value, parameter):
                default = "nothing" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
                raise InputMismatchError(
                    f"argument '{name}' of {self.model_name} was not in example_inputs, so the graph was captured "
                    f"with its default ({default}); given {_describe(value)}. Plan with it in example_inputs to pass it"
                )
        return positional[: self.n_example]

    def _check(self, leaf: PlannedLeaf, value: Any) -> bool:
        """Raise if ``value`` cannot take ``leaf``'s place; True when it differs along dynamic dims."""
        if leaf.meta is None:
            if isinstance(value, torch.Tensor) or type(value) is not type(leaf.value) or value != leaf.value:
                raise InputMismatchError(
                    f"input '{leaf.name}' of {self.model_name} is baked into the graph as {leaf.value!r} (its value in "
                    f"example_inputs); given {_describe(value)}. Call with {leaf.value!r}, or pass it as a tensor when planning"
                )
            return False
        if not isinstance(value, torch.Tensor):
            raise InputMismatchError(f"input '{leaf.name}' of {self.model_name} was planned as a tensor {format_value(leaf.meta)}; given {_describe(value)}")
        planned, given = leaf.meta.shape, tuple(value.shape)
        if value.dtype != leaf.meta.dtype:
            raise InputMismatchError(
                f"input '{leaf.name}' of {self.model_name} was planned as {format_value(leaf.meta)}, given {_describe(value)}; "
                "pass the planned dtype (convert it), or plan with an example of this dtype"
            )
        if given == planned:
            return False
        fixed = [d for d in range(max(len(planned), len(given))) if d not in leaf.dynamic_dims]
        if len(given) != len(planned) or any(given[d] != planned[d] for d in fixed):
            differing = [d for d in range(min(len(planned), len(given))) if given[d] != planned[d]]
            hint = (
                f"mark dims dynamic with parallelize(..., dynamic_dims={{'{leaf.name}': {tuple(differing)}}}) "
                "to run other sizes, or plan with this shape"
                if len(given) == len(planned) else "pass a tensor of the planned rank"
            )
            raise InputMismatchError(
                f"input '{leaf.name}' of {self.model_name} was planned with shape {planned}, given {given}; {hint}"
            )
        return True


def example_input_names(forward: Callable[..., Any], count: int) -> list[str]:
    """The name of each of ``count`` example positions as ``forward`` calls it (``input k`` where it has none)."""
    return _argument_names(_signature(forward), count)


def _signature(forward: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def _argument_names(signature: inspect.Signature | None, count: int) -> list[str]:
    """The name of each example position as forward calls it (``args[2]`` past a ``*args``)."""
    names: list[str] = []
    for parameter in signature.parameters.values() if signature is not None else ():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            names += [f"{parameter.name}[{k}]" for k in range(count - len(names))]
        elif parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(parameter.name)
        if len(names) >= count:
            break
    return names + [f"input {k}" for k in range(len(names), count)]


def _dims(name: str, dims: Sequence[int] | int) -> frozenset[int]:
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ConfigError(f"dynamic_dims['{name}'] must be tensor dims (ints), got {dims!r}")
    return frozenset(dims)


def _bad_dim(name: str, dim: int, meta: TensorMeta) -> int:
    raise ConfigError(f"dynamic_dims['{name}'] names dim {dim}, but '{name}' has {meta.ndim} dims (shape {meta.shape})")


def _is_default(value: Any, parameter: inspect.Parameter) -> bool:
    default = parameter.default
    if default is inspect.Parameter.empty or isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return value is default
    try:
        return bool(value is default or (type(value) is type(default) and value == default))
    except Exception:  # noqa: BLE001 - an __eq__ that cannot answer means "not the default"
        return False


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {format_value(TensorMeta(tuple(value.shape), value.dtype))}"
    return f"{value!r} ({type(value).__name__})"
