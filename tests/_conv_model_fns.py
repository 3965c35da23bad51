"""Conv front-end models trained sharded on real ranks (tests/test_conv_models.py): module-level,
so spawned ranks can import them.

A toy HF ViT (conv2d patch embedding), a toy Whisper encoder (two conv1d, the second stride 2)
and a small CNN (conv2d -> BatchNorm2d in train mode -> ReLU -> max pool -> conv2d -> GroupNorm ->
adaptive average pool -> Linear), all in train mode with random weights (nothing downloaded).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.api import plan_model
from autotp.cost.model import CostModel, resolve_hardware
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import P, R, Shard, format_placements, local_chunk
from autotp.ir.plan import Plan
from autotp.ir.strategy import OpStrategy, one_axis
from autotp.solve.planner import solve_plan
from tests._hf_fns import _randomize, min_budget, parallelize_planned_once
from tests._training_fns import STATE_FACTOR, adamw_losses

MODELS = ("vit", "whisper", "cnn")
BATCH = 4
COLUMN, ROW = OpStrategy((R, Shard(0), Shard(0)), Shard(1)), OpStrategy((Shard(1), Shard(1), P), P)
# Each model's convs by module path, pinned to a weight split: output channels (the bias split
# with them) or input channels (partial sums, the bias added once). 3 image channels do not split
# in 2, so the first conv of the image models splits its output channels.
PINS = {
    "vit": {"embeddings.patch_embeddings.projection": COLUMN},
    "whisper": {"conv1": COLUMN, "conv2": ROW},
    "cnn": {"conv1": OpStrategy((R, Shard(0)), Shard(1)), "conv2": ROW},
}


class SmallCNN(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU -> max pool -> Conv2d -> GroupNorm -> adaptive average pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        # no bias before a training-mode batch norm: its true gradient is exactly 0, and AdamW
        # would blow the two models' different rounding noise up into steps of either sign
        self.conv1 = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 48, 3, padding=1)
        self.gn = nn.GroupNorm(12, 48)
        self.head = nn.Linear(48 * 4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        return self.head(F.adaptive_avg_pool2d(self.gn(self.conv2(h)), 2).flatten(1))


def build_conv_model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised conv model in train mode, and its one input."""
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model: nn.Module
    if name == "vit":  # a 16x16 image in 4x4 patches
        model = transformers.ViTModel(transformers.ViTConfig(
            hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
            image_size=16, patch_size=4, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ), add_pooling_layer=False)
        x = torch.randn(BATCH, 3, 16, 16, generator=gen)
    elif name == "whisper":  # 12 mel bins over 24 frames; the stride-2 conv2 leaves max_source_positions
        model = WhisperEncoder(transformers.WhisperConfig(
            d_model=48, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=96, num_mel_bins=12,
            max_source_positions=12, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=96,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        ))
        x = torch.randn(BATCH, 12, 24, generator=gen)
    elif name == "cnn":
        model = SmallCNN()
        x = torch.randn(BATCH, 3, 8, 8, generator=gen)
    else:
        raise ValueError(f"unknown conv model {name!r}")
    _randomize(model)
    return model.train(), (x,)


def _output(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _loss(name: str, out: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return _output(out).pow(2).mean()


def _pinned_plan(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], *, world_size: int, budget: int) -> Plan:
    """The training plan under ``budget`` with the model's convs pinned as ``PINS`` says: the
    solver's own choice could move to another split when a rule changes, and the point is to run these."""
    space = plan_model(model, inputs, mesh_shape=(world_size,), hardware="cpu-gloo", memory_budget=budget, training=True).space
    pins = {n.name: one_axis(PINS[name][n.module_path]) for n in space.nodes if n.op.startswith("aten.conv")}
    cost = CostModel(resolve_hardware("cpu-gloo"), MeshSpec.of(world_size), training=True, optimizer="adamw")
    return solve_plan(space, cost, hardware="cpu-gloo", memory_budget=budget, pinned=pins)


def _grad_error(local: torch.Tensor | None, full: torch.Tensor | None, placements: Any, rank: int, world_size: int) -> float:
    """The largest difference of a sharded gradient from its chunk of the original; 0 where
    neither has one (Whisper's sinusoidal positions are frozen), inf where only one has."""
    if local is None or full is None:
        return 0.0 if local is None and full is None else float("inf")
    return (local - local_chunk(full, placements, (world_size,), (rank,))).abs().max().item()


def conv_training_equivalence(rank: int, world_size: int, names: list[str], budget_factor: float) -> dict[str, dict[str, Any]]:
    """Each model planned (by rank 0, for training) under ``(1 + budget_factor)`` times the state
    of every divisible parameter split, then: output, every gradient, the parameters and buffers
    after one AdamW step, against the unsharded model."""
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    report = {}
    for name in names:
        model, inputs = build_conv_model(name)
        budget = int(min_budget(model, world_size) * STATE_FACTOR * (1 + budget_factor))
        sharded = parallelize_planned_once(
            model, inputs, mesh, budget, training=True,
            make_plan=functools.partial(_pinned_plan, name, model, inputs, world_size=world_size, budget=budget),
        )
        placements = sharded.placements()

        expected, actual = _output(model(*inputs)), _output(sharded(*inputs))
        output_error = (actual - expected).abs().max().item()
        _loss(name, expected, inputs).backward()
        _loss(name, actual, inputs).backward()
        grad_errors = {n: _grad_error(p.grad, model.get_parameter(n).grad, placements[n], rank, world_size) for n, p in sharded.named_parameters()}
        model.zero_grad(set_to_none=True)
        sharded.zero_grad(set_to_none=True)
        losses = adamw_losses(model, sharded, _loss, name, inputs, 1)
        full = autotp.full_state_dict(sharded)
        report[name] = {
            "output_error": output_error,
            "output_scale": expected.abs().max().item(),
            "grad_errors": grad_errors,
            "losses": losses,
            "state_errors": {n: (full[n].float() - t.float()).abs().max().item() for n, t in model.state_dict().items()},
            "placements": {n: format_placements(p) for n, p in placements.items()},
            "local_shapes": {n: tuple(p.shape) for n, p in sharded.named_parameters()},
            "full_shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
            "batches_tracked": int(full["bn.num_batches_tracked"]) if "bn.num_batches_tracked" in full else None,
            "conv_strategies": {n.module_path: str(n.strategy) for n in sharded.plan.nodes if n.op.startswith("aten.conv")},
        }
    return report
