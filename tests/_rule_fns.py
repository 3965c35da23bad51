"""What the op-level rule tests share: a model whose forward is a function, captured with the
value of every node."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autotp.capture.export import CapturedGraph, capture
from autotp.rewrite.rule_check import check_graph, node_values
from autotp.strategies.engine import NodeKind, build_strategy_space


class Call(nn.Module):
    """A model whose forward is ``fn(*inputs)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.fn(*inputs)


def captured_with_values(fn: Callable[..., Any] | nn.Module, *inputs: torch.Tensor) -> tuple[CapturedGraph, dict[str, Any]]:
    """``fn`` (a function or a module, run in eval mode) captured on ``inputs``, and the value of
    every node (``autotp.rewrite.rule_check.node_values``); capture's warnings are not the test's."""
    model = (fn if isinstance(fn, nn.Module) else Call(fn)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, inputs)
    return captured, node_values(captured, model, inputs)


def assert_strategies_hold(captured: CapturedGraph, values: dict[str, Any], *, tp_size: int | None = None, mesh_shape: tuple[int, ...] | None = None) -> int:
    """Check every strategy of every node of ``captured`` by brute force (``check_graph``) on
    ``tp_size`` ranks or a ``mesh_shape`` mesh, fail naming each wrong one, and return how many
    (node, strategy) pairs were checked."""
    checked, failures = check_graph(captured, values, tp_size=tp_size, mesh_shape=mesh_shape)
    assert not failures, "\n".join(str(f) for f in failures)
    return checked


@dataclass(frozen=True)
class DrawnCase:
    """``fn(module, *inputs)`` on the inputs ``make(generator)`` draws."""

    fn: Callable[..., Any]
    make: Callable[[torch.Generator], tuple[torch.Tensor, ...]]


def randn_inputs(*shapes: tuple[int, ...]) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    """A ``DrawnCase.make`` drawing one standard-normal tensor per shape."""
    return lambda g: tuple(torch.randn(s, generator=g) for s in shapes)


def ops_without_a_split_rule(captured: CapturedGraph) -> list[str]:
    """The ops of ``captured`` that fall back to replication (no rule, or the rule raised)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = build_strategy_space(captured, 2)
    return [n.op for n in space.nodes if n.kind is NodeKind.OP and n.fallback]
