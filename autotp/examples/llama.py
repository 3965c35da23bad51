"""A LLaMA-style decoder (after Meta's ``llama/model.py`` and torchtitan's ``llama3``).

RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU feed-forward,
all written with plain real-valued ops (no complex numbers, no fused kernels) so that every
op in the captured graph has a sharding rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Sizes of a :class:`Llama`; checked on construction.

    ``ffn_hidden`` defaults to 176, LLaMA's ``2/3 * 4 * dim`` (about 171) rounded up to a
    multiple of 16 so it splits evenly over 2, 4, 8 and 16 ranks. LLaMA-2 7B is
    ``LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
    ffn_hidden=11008, max_seq_len=4096)``.
    """

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 176
    max_seq_len: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"
        ):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {value}")
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                "so every head has the same head_dim"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                f"({self.n_kv_heads}) so each kv head serves a whole group of query heads"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"LlamaConfig head_dim = dim / n_heads = {self.head_dim} must be even: "
                "rotary embeddings rotate pairs of dimensions"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"LlamaConfig.norm_eps must be positive, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16/fp16 activations do not lose the mean of squares.
        x_f32 = x.float()
        normed = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dim: a 90-degree turn per pair."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + head_dim/2) pair of ``x`` by its position's angle.

    x: (B, heads, T, head_dim); cos, sin: (T, head_dim), broadcast over B and heads.
    """
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each kv head ``n_rep`` times: (B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd)."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None, :, :].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary position embeddings."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # (B, T, dim)
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        n_rep = self.n_heads // self.n_kv_heads
        k = repeat_kv(k, n_rep)  # (B, n_heads, T, head_dim)
        v = repeat_kv(v, n_rep)  # (B, n_heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, dim); gate and up: (B, T, ffn_hidden)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attention(attention_norm(x))``, then ``h + ffn(ffn_norm(h))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Token ids ``(B, T)`` -> logits ``(B, T, vocab_size)``; ``output`` is not tied."""

    inv_freq: torch.Tensor

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Derived from the config, so it is left out of the state dict.
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute this module's own ``inv_freq``; each child resets its own tensors, as torch's
        layers do (a per-module initialiser, so a model built on the meta device can replay it)."""
        # theta^(-2i / head_dim) for i in [0, head_dim / 2) (Su et al. 2021, RoFormer eq. 15).
        head_dim = self.config.head_dim
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=self.inv_freq.device) / head_dim
        self.inv_freq.copy_(1.0 / (self.config.rope_theta**exponents))  # (head_dim / 2,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)  # idx: (B, T) int64 token ids
        if T > self.config.max_seq_len:
            raise ValueError(
                f"Llama got a sequence of length {T}, longer than max_seq_len "
                f"{self.config.max_seq_len}; shorten the input or raise max_seq_len"
            )
        pos = torch.arange(T, device=idx.device, dtype=self.inv_freq.dtype)  # (T,)
        angles = torch.outer(pos, self.inv_freq)  # (T, head_dim / 2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim), matches rotate_half
        cos, sin = angles.cos(), angles.sin()
        h = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))  # (B, T, vocab_size)
