"""Custom ``torch.autograd.Function``s survive capture as one opaque node each.

``torch.export`` traces through a Function's ``forward`` and records its ATen ops, so the graph
differentiates them instead of calling the Function's own ``backward``: a straight-through
estimator (``round`` forward, identity backward) would train with zero gradients. While autotp
captures, ``Function.apply`` of a Function defined outside torch is recorded as one call of the
``autotp::autograd_function`` op instead; ``_lift`` then turns that node into a
``FunctionCall`` of the Function itself. The engine has no rule for it, so it runs replicated
on every rank, with the user's forward and backward.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from autotp.capture.torch_compat import pytree
from autotp.errors import CaptureError


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: arguments may be unhashable
class FunctionCall:
    """``function.apply`` with its non-tensor arguments fixed: called with the tensor arguments
    in order, returns the Function's tensor outputs as a tuple (read by ``getitem`` nodes)."""

    function: type[torch.autograd.Function]
    arguments: tuple[Any, ...]  # the flattened (args, kwargs), None where a tensor goes
    tensor_positions: tuple[int, ...]
    spec: Any  # the pytree spec of (args, kwargs)

    @property
    def __name__(self) -> str:  # how the planner and reports name the op
        return f"autograd_function[{self.function.__qualname__}]"

    def __repr__(self) -> str:
        return self.__name__

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = list(self.arguments)
        for position, tensor in zip(self.tensor_positions, tensors, strict=True):
            leaves[position] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return _as_outputs(self.function, _ORIGINAL_APPLY.__get__(None, self.function)(*args, **kwargs))


_ORIGINAL_APPLY = torch.autograd.Function.__dict__["apply"]
_RECORDED: dict[int, FunctionCall] = {}  # by the key the op node carries; alive during one capture
_KEYS = itertools.count()


def _recorded_forward(key: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The recorded Function's forward, without autograd; cloned, since a custom op's outputs may
    not alias its inputs."""
    with torch.no_grad():
        return [t.clone() for t in _RECORDED[key](*tensors)]


@torch.library.custom_op("autotp::autograd_function", mutates_args=())
def autograd_function(key: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One recorded ``Function.apply`` (only the capture's fake run calls it)."""
    return _recorded_forward(key, tensors)


autograd_function.register_fake(_recorded_forward)


@contextlib.contextmanager
def recording_functions() -> Iterator[None]:
    """While capturing, each ``apply`` of a Function defined outside torch is one op node."""

    def apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
        if cls.__module__.split(".")[0] == "torch":
            return _ORIGINAL_APPLY.__get__(None, cls)(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        positions = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
        arguments = tuple(None if i in positions else leaf for i, leaf in enumerate(leaves))
        key = next(_KEYS)
        _RECORDED[key] = FunctionCall(cls, arguments, positions, spec)
        outputs = torch.ops.autotp.autograd_function(key, [leaves[i] for i in positions])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    first_key = next(_KEYS)
    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment, method-assign]
    try:
        yield
    finally:
        torch.autograd.Function.apply = _ORIGINAL_APPLY  # type: ignore[method-assign]
        for key in [k for k in _RECORDED if k >= first_key]:  # left by a capture that failed
            del _RECORDED[key]


def restore_function_calls(gm: fx.GraphModule) -> None:
    """Each recorded op node of ``gm`` becomes a call of its Function (the caller recompiles);
    runs inside ``recording_functions``, which holds the records."""
    op = torch.ops.autotp.autograd_function.default
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is op:
            key, tensors = node.args
            node.target = _RECORDED[key]
            node.args = tuple(tensors)


def _as_outputs(function: type[torch.autograd.Function], result: Any) -> tuple[torch.Tensor, ...]:
    outputs = result if isinstance(result, tuple) else (result,)
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        found = ", ".join("Tensor" if isinstance(o, torch.Tensor) else type(o).__name__ for o in outputs)
        raise CaptureError(
            f"the custom autograd Function {function.__qualname__} returns ({found}); autotp keeps a "
            "custom Function whole only when forward() returns a tensor or a tuple of tensors: return "
            "the other values some other way"
        )
    return outputs
