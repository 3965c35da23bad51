"""The one registry of per-op sharding rules.

A rule looks at one op on one mesh axis and lists candidate strategies: the placement each tensor
input must have and the placement of the output that results. Rules do not list all-replicate
(the engine adds it) and need not check divisibility (the engine drops any strategy that shards a
dim ``tp_size`` does not divide). Ops with shape arguments also register ``localize``, which
rewrites those arguments to rank-local sizes.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from autotp.capture.torch_compat import OpOverload, op_schema
from autotp.ir.strategy import OpStrategy
from autotp.ir.values import TensorMeta

OutputMeta = TensorMeta | tuple[TensorMeta, ...]


@dataclass(frozen=True, slots=True)
class OpContext:
    """What a rule may look at: the node, its arguments, and global metas of its tensors."""

    node: fx.Node
    tp_size: int
    inputs: tuple[TensorMeta, ...]
    output: OutputMeta

    @property
    def args(self) -> tuple[Any, ...]:
        return tuple(self.node.args)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.node.kwargs)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument ``index``/``name`` of the node."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def named_arg(self, name: str, default: Any = None) -> Any:
        """Argument ``name`` located through the op's schema (overloads order args differently)."""
        schema = op_schema(self.node.target)
        if schema is not None:
            for index, argument in enumerate(schema.arguments):
                if argument.name == name:
                    return self.arg(index, name, default) if not argument.kwarg_only else self.node.kwargs.get(name, default)
        return self.node.kwargs.get(name, default)


@dataclass(frozen=True, slots=True)
class LocalContext:
    """What ``localize`` needs to turn global shape arguments into this rank's."""

    rank: int
    tp_size: int
    strategy: OpStrategy
    inputs: tuple[TensorMeta, ...]
    output: OutputMeta


StrategyFn = Callable[[OpContext], Iterable[OpStrategy]]
LocalizeFn = Callable[[tuple[Any, ...], dict[str, Any], LocalContext], tuple[tuple[Any, ...], dict[str, Any]]]
CombinableFn = Callable[[fx.Node, tuple[OpStrategy, ...], tuple[int, ...]], bool]


@dataclass(frozen=True, slots=True)
class Rule:
    strategies: StrategyFn
    localize: LocalizeFn | None = None
    # Positional args that are tensors only for their dtype/device (e.g. ``new_ones``' self):
    # they are not input slots, so any placement passes through unchanged.
    metadata_args: tuple[int, ...] = ()
    view: bool = False  # launches no kernel (a view or pure metadata op): zero compute cost
    # A strategy the op cannot run as itself names the function that runs it locally (called with
    # the localised args and ``group_name=``), e.g. a vocab-parallel embedding's masked lookup.
    local_impl: Callable[[OpStrategy], Callable[..., Any] | None] | None = None
    # Collectives such a local implementation runs inside, as (kind, bytes of the full tensor),
    # so the cost model prices them.
    internal_collectives: Callable[[OpStrategy, tuple[TensorMeta, ...], OutputMeta], tuple[tuple[str, int], ...]] | None = None
    # Whether per-axis answers (one per mesh axis, axis sizes given) run together: a count that is
    # not a tensor dim (a conv's ``groups``) must divide by every axis that splits it, nested.
    combinable: CombinableFn | None = None


RULES: dict[Any, Rule] = {}


def register(
    *targets: Any,
    localize: LocalizeFn | None = None,
    metadata_args: Sequence[int] = (),
    view: bool = False,
    local_impl: Callable[[OpStrategy], Callable[..., Any] | None] | None = None,
    internal_collectives: Callable[[OpStrategy, tuple[TensorMeta, ...], OutputMeta], tuple[tuple[str, int], ...]] | None = None,
    combinable: CombinableFn | None = None,
) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: ``fn`` gives the strategies of every op in ``targets``.

    A target is an op (overload or packet) or the qualified name ``"namespace::op"`` of a
    third-party custom op, which names it without importing the library that defines it.
    """

    def wrap(fn: StrategyFn) -> StrategyFn:
        rule = Rule(fn, localize, tuple(metadata_args), view, local_impl, internal_collectives, combinable)
        for target in targets:
            if target in RULES:
                raise ValueError(f"two rules registered for {target}")
            RULES[target] = rule
        return fn

    return wrap


_POINTWISE_FALLBACK: list[Rule] = []


def set_pointwise_fallback(rule: Rule) -> None:
    """The rule used for any op tagged ``torch.Tag.pointwise`` with no explicit rule."""
    _POINTWISE_FALLBACK[:] = [rule]


def lookup(target: Any) -> Rule | None:
    rule = RULES.get(target)
    if rule is not None:
        return rule
    if isinstance(target, OpOverload):
        packet_rule = RULES.get(target.overloadpacket)
        if packet_rule is not None:
            return packet_rule
        named_rule = RULES.get(target.name().partition(".")[0])  # "transformers::grouped_mm_fallback"
        if named_rule is not None:
            return named_rule
        if torch.Tag.pointwise in target.tags and _POINTWISE_FALLBACK:
            return _POINTWISE_FALLBACK[0]
    return None


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def arg_of(args: tuple[Any, ...], kwargs: dict[str, Any], *, index: int, name: str, default: Any) -> Any:
    """Argument ``index``/``name`` of a call, wherever it was passed (``localize`` sees raw args)."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def with_arg(args: tuple[Any, ...], kwargs: dict[str, Any], *, index: int, name: str, value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with argument ``index``/``name`` set to ``value`` (wherever it was passed)."""
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1:], kwargs
    return args, {**kwargs, name: value}
