"""Capture inlines grad-mode regions (``@torch.no_grad()`` in Hugging Face rotary embeddings)
and refuses other higher-order ops by name."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from autotp.capture.export import InputRole, capture
from autotp.errors import CaptureError


class NoGradScale(nn.Module):
    """``y * s`` where ``s`` is computed from ``y`` under ``no_grad``: no gradient flows through s."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        with torch.no_grad():
            s = (y * 2).sum(-1, keepdim=True).tanh()
        return y * s


class Branches(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t - 1, (x,))


def test_no_grad_region_is_inlined_and_stops_gradients() -> None:
    torch.manual_seed(0)
    model = NoGradScale()
    x = torch.randn(4, 8)
    captured = capture(model, (x,))
    nodes = list(captured.graph_module.graph.nodes)
    assert not [n for n in nodes if n.op == "get_attr"]
    assert any(n.target is torch.ops.aten.detach.default for n in nodes)  # the region's output

    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    flat = [x if gi.role is InputRole.USER_INPUT else params[gi.fqns[0]] for gi in captured.inputs]
    (out,) = captured.graph_module(*flat)
    out.sum().backward()
    model(x).sum().backward()
    torch.testing.assert_close(out, model(x))
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad)


def test_other_higher_order_ops_are_refused_by_name() -> None:
    with pytest.raises(CaptureError, match="higher-order ops.*cond"):
        capture(Branches(), (torch.randn(4),))
