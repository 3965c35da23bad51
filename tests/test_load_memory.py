"""Memory is the point of loading shards: a rank's peak while parallelizing a meta model with
``weights=`` stays near its share of the model, far below the whole (4 gloo ranks, 256 MiB fp32)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from autotp.examples.mlp import MLP
from autotp.testing import run_on_ranks
from tests import _memory_fns

BASELINE_D_MODEL, D_MODEL, LAYERS = 64, 1024, 8  # 8 x (1024 x 4096 x 2) fp32 = 256 MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory is read from /proc")
@pytest.mark.timeout(300)
def test_peak_memory_per_rank_stays_near_its_share(tmp_path: Path) -> None:
    checkpoints = {}
    for d_model in (BASELINE_D_MODEL, D_MODEL):
        torch.manual_seed(0)
        save_file(MLP(_memory_fns.mlp_config(d_model, LAYERS)).state_dict(), tmp_path / f"{d_model}.safetensors", metadata={"format": "pt"})
        checkpoints[d_model] = str(tmp_path / f"{d_model}.safetensors")
    reports = run_on_ranks(_memory_fns.parallelize_growth, 4, checkpoints, LAYERS, timeout_seconds=280)
    for rank, report in enumerate(reports):
        baseline, big = report[BASELINE_D_MODEL]["growth"], report[D_MODEL]
        assert big["full"] >= 250 * 2**20 and big["full"] >= 3.9 * big["share"], (rank, big)  # a model 4 x the share
        assert big["growth"] <= 1.5 * big["share"] + baseline, (rank, big, baseline)
        assert big["growth"] <= big["full"] / 2, (rank, big)
