"""Rank functions for the plan hand-over tests: module-level, so spawned ranks can import them."""
from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import autotp
from autotp.examples import build_example
from autotp.examples.gpt import CausalSelfAttention
from autotp.io.fingerprint import LAYOUT_ONLY_OPS
from autotp.rewrite.rewriter import collective_nodes
from tests._hf_fns import _logits, build_hf_model

ATOL, RTOL = 1e-5, 1e-4


def apply_saved_plan(rank: int, world_size: int, plan_path: str, example: str, config: dict[str, Any], batch: int, seq: int) -> dict[str, Any]:
    """Plan file -> Plan.load -> parallelize(plan=...) -> the original model's outputs."""
    model, inputs = build_example(example, batch=batch, seq=seq, **config)
    plan = autotp.Plan.load(plan_path)
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = autotp.parallelize(model, mesh, inputs, plan=plan)
    with torch.no_grad():
        expected = model(*inputs)
        actual = sharded(*inputs)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
    return {
        "max_abs_diff": (actual - expected).abs().max().item(),
        # the same layout; a layout-only node (contiguous) the meta graph has and the CPU one lacks aside
        "same_layout": all(
            sharded.plan.node(n.name).strategy == n.strategy
            for n in plan.nodes if n.op not in LAYOUT_ONLY_OPS
        ),
        "nodes": (len(plan.nodes), len(sharded.plan.nodes)),
        "collectives": len(collective_nodes(sharded.graph_module)),
        "split_params": sorted(n for n, p in sharded.named_parameters() if p.shape != model.get_parameter(n).shape),
    }


class HeadsFromDataAttention(CausalSelfAttention):
    """The GPT example's attention with torchtitan's reshapes: the head count comes from the data
    (``-1``), so the same code runs on all heads or on a rank's column-split share of them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()  # (B, T, n_embd)
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_head/tp, T, head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, n_embd/tp)
        return self.resid_drop(self.c_proj(y))


class HeadDimFromDataAttention(CausalSelfAttention):
    """A plausible wrong port: ``view(B, T, self.n_head, -1)`` runs on a column-split projection,
    but with the global head count it halves head_dim and mixes heads instead of taking half of them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, n_head, T, head_dim/tp): wrong
        k = self.k_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_drop(self.c_proj(y))


ATTENTION_VARIANTS = {"heads_from_data": HeadsFromDataAttention, "head_dim_from_data": HeadDimFromDataAttention}


def build_case(case: dict[str, Any], *, device: str = "cpu") -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A case's model and inputs: a built-in example (its attention optionally swapped for one of
    ``ATTENTION_VARIANTS``, weights unchanged) or a tiny Hugging Face model (``hf_model``; real weights)."""
    if "hf_model" in case:
        return build_hf_model(case["hf_model"])
    model, inputs = build_example(case["example"], device=device, batch=case["batch"], seq=case["seq"], **case["config"])
    if "attention" in case:
        for module in model.modules():
            if isinstance(module, CausalSelfAttention):
                module.__class__ = ATTENTION_VARIANTS[case["attention"]]
    return model, inputs


def apply_torch_tp(rank: int, world_size: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """For each case: parallelize_module with the emitted plan; compare with the unsharded model."""
    from torch.distributed.tensor.parallel import parallelize_module

    from autotp.io.torch_tp import to_parallelize_plan

    mesh = init_device_mesh("cpu", (world_size,))
    report = {}
    for case in cases:
        model, inputs = build_case(case)
        with torch.no_grad():
            expected = _logits(model(*inputs))
        with open(case["plan_path"], encoding="utf-8") as f:
            data = json.load(f)
        parallelize_module(model, mesh, to_parallelize_plan(data))
        with torch.no_grad():
            actual = _logits(model(*inputs))
        actual = actual.full_tensor() if isinstance(actual, DTensor) else actual
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
        report[case["name"]] = {
            "max_abs_diff": (actual - expected).abs().max().item(),
            "split_params": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor) and p.to_local().shape != p.shape),
        }
    return report
