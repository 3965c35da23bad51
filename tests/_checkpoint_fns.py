"""Rank functions for tests/test_save_pretrained.py: module-level, so spawned ranks can import them."""
from __future__ import annotations

import errno
import os
from typing import Any
from unittest import mock

import torch
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.io.hf_checkpoint import SafetensorsWriter
from autotp.ir.placement import Shard, local_chunk
from autotp.ir.plan import Plan
from autotp.runtime.checkpoint import _gather_full
from tests._hf_fns import budget_for, build_hf_model, parallelize_planned_once

SHARD_SIZE = "100KB"  # the tiny models are about 500 kB: several files each


def save_hf_models(rank: int, world_size: int, directory: str, names: list[str]) -> dict[str, Any]:
    """Save each model, parallelized with every weight that matters split, as Hugging Face does;
    then a bfloat16 save, uneven gathers, and two saves that fail on rank 0 (every rank reports)."""
    mesh = init_device_mesh("cpu", (world_size,))
    report: dict[str, Any] = {}
    sharded = None
    for name in names:
        model, inputs = build_hf_model(name)
        sharded = parallelize_planned_once(model, inputs, mesh, budget_for(model, world_size, 0.5))
        autotp.save_pretrained(sharded, os.path.join(directory, name), max_shard_size=SHARD_SIZE, config=model.config)
        report[name] = {"split": sorted(n for n, p in sharded.placements().items() if any(isinstance(q, Shard) for q in p))}
    assert sharded is not None
    autotp.save_pretrained(sharded, os.path.join(directory, "bf16"), dtype=torch.bfloat16, config=model.config)

    uneven = {}  # torch.chunk's parts: 5 rows on 2 ranks are 3 + 2, 1 row is 1 + 0
    for shape, dim in [((5, 3), 0), ((4, 1), 1), ((1, 4), 0), ((2, 7), 1)]:
        full = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
        placements = (Shard(dim),)
        local = local_chunk(full, placements, (world_size,), sharded.coordinate)
        uneven[str(shape)] = (tuple(local.shape), torch.equal(_gather_full(sharded, local, placements, shape), full))
    report["uneven"] = uneven

    blocker = os.path.join(directory, "a_file")  # rank 0 cannot make the directory
    if rank == 0:
        with open(blocker, "w") as f:
            f.write("in the way")
    report["blocked"] = _error_of(sharded, os.path.join(blocker, "model"))
    report["config_errors"] = []  # raised on every rank before any collective
    for kwargs in [{"max_shard_size": "lots"}, {"max_shard_size": 0}, {"dtype": torch.int64}, {"config": object()}]:
        try:
            autotp.save_pretrained(sharded, os.path.join(directory, "never"), **kwargs)
        except autotp.ConfigError as e:
            report["config_errors"].append(str(e))
    report["disk_full"], report["writes_before_failure"] = _disk_full(sharded, os.path.join(directory, "full"))
    return report


def save_on_mesh(rank: int, world_size: int, directory: str, plan_data: dict) -> dict[str, Any]:
    """Save the tiny GPT-2 parallelized with ``plan`` (a (2, 2) mesh: nested gathers, the writer at
    coordinate (0, 0)); then a save that fails at the writer, which every rank must report."""
    plan = Plan.from_dict(plan_data)
    model, inputs = build_hf_model("gpt2")
    mesh = init_device_mesh("cpu", tuple(plan.mesh_shape), mesh_dim_names=tuple(plan.mesh_axis_names))
    sharded = autotp.parallelize(model, mesh, inputs, plan=plan)
    autotp.save_pretrained(sharded, directory, max_shard_size=SHARD_SIZE, config=model.config)
    disk_full, writes = _disk_full(sharded, directory + "-full")
    return {"coordinate": sharded.coordinate, "disk_full": disk_full, "writes_before_failure": writes}


def _disk_full(sharded: autotp.ShardedModule, directory: str) -> tuple[str, int]:
    """The error of a save whose third write finds the disk full, and how many writes this rank tried."""
    written = [0]

    def disk_full(self: SafetensorsWriter, name: str, tensor: torch.Tensor) -> None:
        written[0] += 1
        if written[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch.object(SafetensorsWriter, "write", disk_full):  # only the writer (rank 0 of the mesh) calls it
        return _error_of(sharded, directory), written[0]


def _error_of(sharded: autotp.ShardedModule, directory: str) -> str:
    try:
        autotp.save_pretrained(sharded, directory, max_shard_size=SHARD_SIZE)
    except autotp.CheckpointError as e:
        return str(e)
    return ""
