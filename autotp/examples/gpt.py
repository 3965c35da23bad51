"""A nanoGPT-style GPT-2 decoder (after Karpathy's ``nanoGPT/model.py``).

Two deliberate departures from nanoGPT, both to give the planner plain ops to shard:
attention uses separate ``q_proj`` / ``k_proj`` / ``v_proj`` linears instead of one fused
``c_attn`` (a fused QKV weight split on dim 0 would mix q, k and v heads on one rank), and
``nn.LayerNorm`` with ``bias=`` replaces nanoGPT's hand-written LayerNorm.

GPT-2's init (weights N(0, 0.02), biases 0, residual output projections N(0, 0.02 / sqrt(2 *
n_layer))) is drawn by each linear and embedding as it is built, not by a pass over the whole
model afterwards as nanoGPT does: a model built on the meta device and initialised module by
module (``autotp.runtime.shard_init``) then gets the same values as one built directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class GPTConfig:
    """Sizes of a :class:`GPT`; checked on construction.

    GPT-2 small is ``GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12,
    n_embd=768)`` (50304 is nanoGPT's 50257 padded up to a multiple of 64).
    """

    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {value}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                "so every head has the same head_dim"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class NormalLinear(nn.Linear):
    """``nn.Linear`` initialised as GPT-2's: weight N(0, ``std``), bias 0."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, std: float = 0.02) -> None:
        self.std = std  # set first: nn.Linear.__init__ ends by calling reset_parameters
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NormalEmbedding(nn.Embedding):
    """``nn.Embedding`` initialised as GPT-2's: N(0, 0.02)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)


def residual_std(config: GPTConfig) -> float:
    """GPT-2 scales the init of residual-stream output projections by 1/sqrt(2 * n_layer)."""
    return 0.02 / math.sqrt(2 * config.n_layer)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v projections."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.q_proj = NormalLinear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = NormalLinear(config.n_embd, config.n_embd, bias=config.bias)
        self.v_proj = NormalLinear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj = NormalLinear(config.n_embd, config.n_embd, bias=config.bias, std=residual_std(config))
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # (B, T, n_embd)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        # q, k, v: (B, n_head, T, head_dim)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, n_embd)
        return self.resid_drop(self.c_proj(y))


class GPTMLP(nn.Module):
    """``c_proj(gelu(c_fc(x)))`` with a 4x hidden width."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = NormalLinear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = NormalLinear(4 * config.n_embd, config.n_embd, bias=config.bias, std=residual_std(config))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, n_embd); hidden: (B, T, 4 * n_embd)
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = GPTMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids ``(B, T)`` -> logits ``(B, T, vocab_size)``; ``lm_head`` reuses ``wte.weight``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = NormalEmbedding(config.vocab_size, config.n_embd)
        self.wpe = NormalEmbedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = NormalLinear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as in GPT-2: one (vocab_size, n_embd) parameter, wte's.
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size), or with ``targets`` (B, T) the mean cross-entropy loss,
        computed inside the model as nanoGPT does, so a planner can split the vocabulary."""
        T = idx.size(1)  # idx: (B, T) int64 token ids
        if T > self.config.block_size:
            raise ValueError(
                f"GPT got a sequence of length {T}, longer than block_size "
                f"{self.config.block_size}; shorten the input or raise block_size"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, n_embd)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
