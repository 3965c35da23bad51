"""Per-rank memory while parallelizing a model that does not fit one rank: module-level, for spawned ranks."""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.examples.mlp import MLP, MLPConfig
from autotp.testing import peak_resident_growth


def mlp_config(d_model: int, n_layers: int) -> MLPConfig:
    return MLPConfig(d_model=d_model, d_hidden=4 * d_model, n_layers=n_layers)


def state_nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def parallelize_growth(rank: int, world_size: int, checkpoints: dict[int, str], n_layers: int) -> dict[int, dict[str, Any]]:
    """For each ``d_model: path`` (smallest first: the baseline), build the MLP on the meta device, parallelize it with
    ``weights=path`` under a budget that splits every weight, and measure this rank's peak resident growth."""
    mesh = init_device_mesh("cpu", (world_size,))
    sizes = sorted(checkpoints)
    report = {}
    for d_model in [sizes[0], *sizes]:  # the first run warms up imports and caches; the next is the baseline
        config = mlp_config(d_model, n_layers)
        with torch.device("meta"):
            model = MLP(config)
        full = state_nbytes(model)
        inputs = (torch.randn(2, 8, d_model),)
        call = partial(
            autotp.parallelize, model, mesh, inputs, hardware="cpu-gloo", training=False, memory_budget=int(full / world_size * 1.2), weights=checkpoints[d_model],
        )
        sharded, growth = peak_resident_growth(call)
        report[d_model] = {"growth": growth, "share": state_nbytes(sharded), "full": full}
        del sharded
    return report
