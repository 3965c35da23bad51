"""Mixture-of-experts ``transformers`` models for the end-to-end tests: module-level, so spawned
ranks can import them.

Toy Mixtral and Qwen2-MoE (one layer, 4 experts, top-2, random weights, nothing downloaded). Their
experts run transformers' ``grouped_mm`` implementation: sort by expert, ``histc`` counts, and
the grouped matmul ``transformers::grouped_mm_fallback`` on CPU.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.ir.placement import format_placements, local_chunk
from tests._hf_fns import _randomize, min_budget, parallelize_planned_once
from tests._training_fns import adamw_losses

MODELS = ("mixtral", "qwen2_moe")
VOCAB, BATCH, SEQ = 64, 2, 12
STATE_FACTOR = 4  # fp32 weights + gradients + two AdamW moments, per parameter byte
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def build_moe_model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised MoE causal LM in train mode, and its ``(input_ids,)``."""
    import transformers

    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=32, use_cache=False,
    )
    model: nn.Module
    if name == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **common))
    elif name == "qwen2_moe":
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=48, **common,
        ))
    else:
        raise ValueError(f"unknown MoE model {name!r}")
    _randomize(model)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


def _loss(name: str, out: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross entropy on the logits (the router's auxiliary loss is off by default)."""
    targets = torch.roll(inputs[0], -1, dims=1)
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())


def moe_training_equivalence(rank: int, world_size: int, names: list[str], budget_factor: float) -> dict[str, dict[str, Any]]:
    """Each model planned (by rank 0, for training) under ``(1 + budget_factor)`` times the state
    of every divisible parameter split, then: logits, every gradient, and the parameters after
    one AdamW step, against the unsharded model."""
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    report = {}
    for name in names:
        model, inputs = build_moe_model(name)
        budget = int(min_budget(model, world_size) * STATE_FACTOR * (1 + budget_factor))
        sharded = parallelize_planned_once(model, inputs, mesh, budget, training=True)
        placements = sharded.placements()

        expected, actual = model(*inputs), sharded(*inputs)
        logits_error = (actual.logits - expected.logits).abs().max().item()
        _loss(name, expected, inputs).backward()
        _loss(name, actual, inputs).backward()
        grad_errors = {
            n: (p.grad - local_chunk(model.get_parameter(n).grad, placements[n], (world_size,), (rank,))).abs().max().item()
            for n, p in sharded.named_parameters()
        }
        model.zero_grad(set_to_none=True)
        sharded.zero_grad(set_to_none=True)
        losses = adamw_losses(model, sharded, _loss, name, inputs, 1)
        full = autotp.full_state_dict(sharded)
        report[name] = {
            "logits_error": logits_error,
            "logits_scale": expected.logits.abs().max().item(),
            "grad_errors": grad_errors,
            "losses": losses,
            "param_errors": {n: (full[n] - t).abs().max().item() for n, t in model.state_dict().items()},
            "placements": {n: format_placements(p) for n, p in placements.items()},
            "local_shapes": {n: tuple(p.shape) for n, p in sharded.named_parameters()},
            "full_shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
        }
    return report
