"""A stack of residual MLP blocks: the smallest model with a column -> row parallel pair.

Each block is ``x + fc2(gelu(fc1(x)))``. Splitting ``fc1`` on its output features and
``fc2`` on its input features (Megatron's MLP split) needs one all-reduce per block, which
makes this the reference case for the planner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class MLPConfig:
    """Sizes of an :class:`MLP`; checked on construction."""

    d_model: int = 64
    d_hidden: int = 256
    n_layers: int = 2
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "n_layers"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"MLPConfig.{name} must be positive, got {value}")


class MLPBlock(nn.Module):
    """``x + fc2(gelu(fc1(x)))``."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_hidden, bias=config.bias)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(config.d_hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d_model); hidden: (B, T, d_hidden)
        return x + self.fc2(self.gelu(self.fc1(x)))


class MLP(nn.Module):
    """``config.n_layers`` residual MLP blocks, named ``layers.{i}.fc1`` / ``layers.{i}.fc2``."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MLPBlock(config) for _ in range(config.n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d_model) -> (B, T, d_model)
        for layer in self.layers:
            x = layer(x)
        return x
