"""Conv models for tests/test_rules_conv.py: module-level, so spawned ranks can import them."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.ir.placement import Shard, format_placements, local_chunk


def build_vit() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A one-layer ``ViTModel``: a 24x24 image in 6x6 patches, embedded by a conv2d."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
        image_size=24, patch_size=6, num_channels=3,
    )
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    _randomize(model)
    return model, (torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1)),)


def build_whisper_encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A one-layer Whisper encoder: 12 mel bins over 24 frames, through conv1d and a stride-2 conv1d."""
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        d_model=48, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=96, num_mel_bins=12,
        max_source_positions=12, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=96,
    )
    model = WhisperEncoder(config).eval()
    _randomize(model)
    return model, (torch.randn(2, 12, 24, generator=torch.Generator().manual_seed(1)),)


def _randomize(model: nn.Module) -> None:
    """HF init leaves biases 0 and norm weights 1, which would hide a wrong split."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else noise / p[0].numel() ** 0.5)


class ConvNet(nn.Module):
    """Conv1d -> GroupNorm -> GELU -> max pool -> Conv1d -> average pool: a small audio front-end."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(12, 48, 3, padding=1)
        self.norm = nn.GroupNorm(12, 48)
        self.conv2 = nn.Conv1d(48, 24, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool1d(F.gelu(self.norm(self.conv1(x))), 2)
        return F.adaptive_avg_pool1d(self.conv2(h), 3).flatten(1)


def build_convnet() -> tuple[ConvNet, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = ConvNet()
    _randomize(model)
    return model, (torch.randn(4, 12, 24, generator=torch.Generator().manual_seed(1)),)


def convnet_equivalence(rank: int, world_size: int) -> dict[str, Any]:
    """Parallelize ConvNet under a budget that only fits with the conv weights split; compare the
    output and every gradient with the original's."""
    mesh = init_device_mesh("cpu", (world_size,))
    model, inputs = build_convnet()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # weights + gradients + two AdamW moments, just above an even share: every big weight splits
    sharded = autotp.parallelize(model, mesh, inputs, memory_budget=int(nbytes * 4 / world_size * 1.1))
    placements = sharded.placements()
    expected = model(*inputs)
    actual = sharded(*inputs)
    expected.pow(2).mean().backward()
    actual.pow(2).mean().backward()
    grad_error = max(
        (p.grad - local_chunk(model.get_parameter(n).grad, placements[n], (world_size,), (rank,))).abs().max().item()
        for n, p in sharded.named_parameters()
    )
    return {
        "output_error": (actual - expected).abs().max().item(),
        "grad_error": grad_error,
        "placements": {n: format_placements(p) for n, p in placements.items()},
        "split": sorted(n for n, p in placements.items() if any(isinstance(q, Shard) for q in p)),
        "local_shapes": {n: tuple(p.shape) for n, p in sharded.named_parameters()},
    }
