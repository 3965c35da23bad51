"""Hugging Face models for the end-to-end tests: module-level, so spawned ranks can import them.

Tiny configs with random weights (nothing is downloaded). ``autotp.parallelize`` takes the
unmodified ``transformers`` model: ``example_inputs`` is ``(input_ids,)`` and the sharded model
returns the same ``ModelOutput`` type as the original (the exported output spec rebuilds it).
``parallelize`` takes positional tensors only, so a model called with keywords such as
``attention_mask=`` goes behind a small wrapper (``WithAttentionMask``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

import autotp
from autotp.ir.placement import format_placements
from autotp.ir.plan import Plan
from autotp.rewrite.rewriter import collective_nodes
from autotp.strategies.engine import UnsupportedOpWarning

ATOL = 1e-4  # on logits of standard deviation about 1
VOCAB, BATCH, SEQ = 256, 2, 16  # the vocabulary divides by 2 and 4 ranks
MODELS = ("gpt2", "llama", "bert", "bert+mask")


class WithAttentionMask(nn.Module):
    """``parallelize`` takes positional tensors only: this passes a padding mask by keyword."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


# Decoders configured as LLaMA is (the same argument names): Qwen2 adds q/k/v biases, Phi-3 fuses qkv.
LLAMA_LIKE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}


def build_hf_model(name: str, *, attn_implementation: str = "sdpa") -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised ``transformers`` model in eval mode, and its ``(input_ids,)``.

    ``name`` is ``family[-attn_implementation][+mask]``; ``+mask`` wraps the model to take a
    padding mask as well (the first sequence ends 4 tokens early).
    """
    import transformers

    if name.endswith("+mask"):
        model, (ids,) = build_hf_model(name.removesuffix("+mask"), attn_implementation=attn_implementation)
        mask = torch.ones_like(ids)
        mask[0, -4:] = 0
        return WithAttentionMask(model).eval(), (ids, mask)
    torch.manual_seed(0)
    family, _, variant = name.partition("-")
    attn = variant or attn_implementation
    if family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False,
            bos_token_id=0, eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif family in LLAMA_LIKE:
        config_class, model_class = (getattr(transformers, name) for name in LLAMA_LIKE[family])
        config = config_class(
            hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model = model_class(config)
    elif family == "bert":
        config = transformers.BertConfig(
            hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
            vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
        )
        model = transformers.BertForMaskedLM(config)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.config._attn_implementation = attn
    model.eval()
    _randomize(model)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


def _randomize(model: nn.Module) -> None:
    """Redraw every parameter: HF init leaves biases 0 and norm weights 1, which hide wrong splits."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else noise / p.shape[-1] ** 0.5)  # norms ~1, matrices N(0, 1/fan_in)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def min_budget(model: nn.Module, world_size: int) -> int:
    """Parameter bytes per rank when every parameter with a dim ``world_size`` divides is split."""
    total = 0
    for p in model.parameters():  # tied weights once
        split = any(size % world_size == 0 and size >= world_size for size in p.shape)
        total += p.numel() * p.element_size() // (world_size if split else 1)
    return total


def budget_for(model: nn.Module, world_size: int, factor: float) -> int:
    """``factor > 1``: ``factor`` even shares of the parameter bytes (the planner still picks
    what to split). ``factor < 1``: ``(1 + factor) * min_budget``, which forces every weight
    big enough to matter to be split, the attention projections included."""
    if factor > 1:
        return int(sum(p.numel() * p.element_size() for p in model.parameters()) / world_size * factor)
    return int(min_budget(model, world_size) * (1 + factor))


def parallelize_planned_once(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], mesh: DeviceMesh, budget: int, *, training: bool = False,
    time_limit_s: float = 60.0, make_plan: Callable[[], Plan] | None = None,
) -> autotp.ShardedModule:
    """``autotp.parallelize`` with a plan made by rank 0 alone and sent to the others
    (``make_plan``, on rank 0: a plan of the test's own, e.g. with pinned nodes).

    One CBC solve per model instead of one per rank: ranks solving at once on a two-core CI box
    take ``world_size`` times as long. The other ranks check the plan fits their own capture.
    """
    plan: list[Plan | None] = [None]
    if mesh.get_local_rank() == 0:
        plan = [make_plan() if make_plan is not None else autotp.plan(
            model, inputs, mesh_shape=(mesh.size(),), hardware="cpu-gloo", memory_budget=budget,
            training=training, time_limit_s=time_limit_s,
        )]
    dist.broadcast_object_list(plan, src=0, group=mesh.get_group())
    return autotp.parallelize(model, mesh, inputs, plan=plan[0], training=training)


def hf_equivalence(rank: int, world_size: int, names: list[str], budget_factors: list[float]) -> dict[str, dict[str, Any]]:
    """Parallelize each model under budgets that force splits (see ``budget_for``); compare
    logits with the original."""
    mesh = init_device_mesh("cpu", (world_size,))
    report = {}
    for name in names:
        for factor in budget_factors:
            model, inputs = build_hf_model(name)
            budget = budget_for(model, world_size, factor)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UnsupportedOpWarning)
                sharded = parallelize_planned_once(model, inputs, mesh, budget)
            with torch.no_grad():
                expected = model(*inputs)
                actual = sharded(*inputs)
            report[f"{name}@{factor}"] = {
                "output_type": type(actual).__name__,
                "expected_type": type(expected).__name__,
                "max_abs_diff": (_logits(actual) - _logits(expected)).abs().max().item(),
                "unsupported": [str(w.message) for w in caught if issubclass(w.category, UnsupportedOpWarning)],
                **sharding_report(model, sharded),
            }
    return report


def sharding_report(model: nn.Module, sharded: autotp.ShardedModule) -> dict[str, Any]:
    """What was split and which collectives run, for the test to assert on."""
    return {
        "collectives": [n.target.__name__ for n in collective_nodes(sharded.graph_module)],
        "local_params": sum(p.numel() for p in sharded.parameters()),
        "full_params": sum(p.numel() for p in model.parameters()),
        "state_key_difference": sorted(set(model.state_dict()) ^ set(sharded.state_dict())),
        "placements": {n: format_placements(p) for n, p in sharded.placements().items()},  # "S(0)" on a 1-D mesh
        "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
        "attention": [str(n.strategy) for n in sharded.plan.nodes if n.op.startswith("aten.scaled_dot_product_attention")],
        "solver_status": sharded.plan.solver_status,
    }
