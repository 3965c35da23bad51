"""Rank functions for tests/test_uneven_heads.py: module-level, so spawned ranks can import them."""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh

from autotp.examples import build_example
from tests._hf_fns import budget_for, parallelize_planned_once, sharding_report

# A feasible plan is all these tests need, and CBC can take a minute to prove one optimal.
TIME_LIMIT_S = 10.0


def llama_equivalence(rank: int, world_size: int, configs: dict[str, dict[str, int]], factor: float) -> dict[str, dict[str, Any]]:
    """Each built-in llama config, parallelized under ``budget_for(factor)``, against the original."""
    mesh = init_device_mesh("cpu", (world_size,))
    report = {}
    for key, config in configs.items():
        model, inputs = build_example("llama", **config)
        sharded = parallelize_planned_once(model, inputs, mesh, budget_for(model, world_size, factor), time_limit_s=TIME_LIMIT_S)
        with torch.no_grad():
            expected = model(*inputs)
            actual = sharded(*inputs)
        report[key] = {"max_abs_diff": (actual - expected).abs().max().item(), **sharding_report(model, sharded)}
    return report
