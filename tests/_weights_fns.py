"""Rank functions for loading weights into meta models (``parallelize(..., weights=)``): module-level, so spawned ranks import them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.errors import AutoTPError
from autotp.ir.placement import format_placements
from autotp.rewrite.rewriter import collective_nodes
from tests._hf_fns import _logits, budget_for, build_hf_model


def meta_copy(model: nn.Module) -> nn.Module:
    """The same architecture on the meta device: what a user builds when the model does not fit."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    return copy.train(model.training)


def _load_report(name: str, sharded: autotp.ShardedModule, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    with torch.no_grad():
        diff = (_logits(sharded(*inputs)) - _logits(model(*inputs))).abs().max().item()
    return {
        "max_abs_diff": diff,
        "split": sorted(n for n, p in sharded.placements().items() if format_placements(p) != "R"),
        "collectives": len(collective_nodes(sharded.graph_module)),
        "meta_left": sorted(n for n, t in sharded.state_dict().items() if t.is_meta),
        "local_numel": sum(t.numel() for t in sharded.state_dict().values()),
        "full_numel": sum(t.numel() for t in model.state_dict().values()),
    }


def load_into_meta(rank: int, world_size: int, checkpoints: dict[str, str], budget_factor: float) -> dict[str, dict[str, Any]]:
    """For each ``"model@format": path``, parallelize a meta copy of the model with ``weights=path``; compare with the original."""
    mesh = init_device_mesh("cpu", (world_size,))
    reports = {}
    for key, path in checkpoints.items():
        model, inputs = build_hf_model(key.partition("@")[0])
        sharded = autotp.parallelize(
            meta_copy(model), mesh, inputs, hardware="cpu-gloo", training=False, memory_budget=budget_for(model, world_size, budget_factor), weights=path,
        )
        reports[key] = _load_report(key, sharded, model, inputs)
    return reports


def save_dcp(rank: int, world_size: int, names: list[str], directory: str) -> None:
    """Parallelize each real model under a budget that splits it, and save its shards with DCP under ``directory/name``."""
    mesh = init_device_mesh("cpu", (world_size,))
    for name in names:
        model, inputs = build_hf_model(name)
        sharded = autotp.parallelize(model, mesh, inputs, hardware="cpu-gloo", training=False, memory_budget=budget_for(model, world_size, 0.5))
        dcp.save(autotp.sharded_state_dict(sharded), checkpoint_id=str(Path(directory) / name))


def bad_checkpoints(rank: int, world_size: int, cases: dict[str, str], only_rank1: str) -> dict[str, str]:
    """``parallelize`` with each bad ``weights=``; the error type and message each rank saw.

    ``only_rank1`` is a bad path given to rank 1 alone (the others get a good one): every rank must still raise.
    """
    mesh = init_device_mesh("cpu", (world_size,))
    model, inputs = build_hf_model("llama")
    seen = {}
    for key, path in {**cases, "only_rank1": only_rank1 if rank == 1 else cases["good"]}.items():
        try:
            autotp.parallelize(meta_copy(model), mesh, inputs, hardware="cpu-gloo", training=False, weights=path, setup_timeout_s=60)
            seen[key] = "ok"
        except AutoTPError as exc:
            seen[key] = f"{type(exc).__name__}: {exc}"
    return seen


def load_in_bf16(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """An fp32 checkpoint loaded into a meta model with ``dtype=torch.bfloat16``; compared with the original converted alike."""
    mesh = init_device_mesh("cpu", (world_size,))
    model, inputs = build_hf_model("llama")
    meta = meta_copy(model)
    model.to(torch.bfloat16)  # the reference, and the budget: bf16 halves the bytes
    sharded = autotp.parallelize(
        meta, mesh, inputs, hardware="cpu-gloo", training=False, memory_budget=budget_for(model, world_size, 0.5),
        weights=path, dtype=torch.bfloat16,
    )
    report = _load_report("llama", sharded, model, inputs)
    report["dtypes"] = sorted({str(t.dtype) for t in sharded.state_dict().values() if t.is_floating_point()})
    return report


def init_on_meta(rank: int, world_size: int) -> dict[str, Any]:
    """The GPT example built on the meta device, initialised part by part (no weights): gathered, it equals the seeded original."""
    from autotp.examples.gpt import GPT, GPTConfig

    mesh = init_device_mesh("cpu", (world_size,))
    config = GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=64)
    with torch.device("meta"):
        meta = GPT(config)
    inputs = (torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)),)
    torch.manual_seed(3)
    sharded = autotp.parallelize(meta, mesh, inputs, hardware="cpu-gloo", training=False, memory_budget="240KB")
    torch.manual_seed(3)
    model = GPT(config).eval()
    full = autotp.full_state_dict(sharded)
    arange_init = autotp.parallelize(
        meta, mesh, inputs, hardware="cpu-gloo", training=False, memory_budget="240KB",
        init_fn=lambda name, local, shape, shard: local.copy_(torch.arange(shape.numel(), dtype=local.dtype).view(shape)[shard.index]),
    )
    return {
        **_load_report("gpt", sharded, model, inputs),
        "state_diff": max((full[k] - v).abs().max().item() for k, v in model.state_dict().items()),
        "keys_equal": sorted(full) == sorted(model.state_dict()),
        "arange_ok": all(torch.equal(v, torch.arange(v.numel(), dtype=v.dtype).view(v.shape)) for v in autotp.full_state_dict(arange_init).values()),
    }
