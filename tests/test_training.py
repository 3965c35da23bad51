"""Training on real gloo ranks: gradients, optimizer steps, checkpoints and dropout."""
from __future__ import annotations

import pytest
import torch

import autotp
from autotp.examples import build_example
from autotp.ir.placement import Shard
from autotp.testing import run_on_ranks
from tests import _mesh_fns, _training_fns

MODELS = ["mlp", "gpt", "llama"]
STEPS = 5


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world_size", [2, 4])
def test_gradients_adamw_steps_and_full_state_dict(world_size: int) -> None:
    reports = run_on_ranks(_training_fns.training_equivalence, world_size, MODELS, STEPS, timeout_seconds=840)
    for rank, report in enumerate(reports):
        for name, r in report.items():
            assert r["split_params"] > 0 and r["collectives"] > 0, (rank, name, r)  # really sharded
            assert r["grad_error"] <= 1e-5, (rank, name, r["grad_error"])
            assert r["sharded_losses"] == pytest.approx(r["reference_losses"], abs=1e-4), (rank, name)
            assert r["reference_losses"][-1] < r["reference_losses"][0], (name, "the steps did train")
            assert r["param_error"] <= 1e-4, (rank, name, r["param_error"])
            assert r["roundtrip_error"] <= 1e-5, (rank, name, r["roundtrip_error"])


@pytest.mark.timeout(600)
def test_dcp_checkpoint_saved_on_2_ranks_loads_on_4(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    saved = run_on_ranks(_training_fns.dcp_save, 2, path, timeout_seconds=300)
    loaded = run_on_ranks(_training_fns.dcp_load, 4, path, timeout_seconds=300)
    expected = saved[0]
    for r in loaded:
        assert r["split_params"] > 0
        assert r["out"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.timeout(600)
def test_dcp_checkpoint_saved_on_2x2_loads_on_4_ranks_1d_and_in_one_process(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    plan = _mesh_fns.plan_2d("gpt")
    assert all(any(isinstance(p[axis], Shard) for p in plan.sharded_state().values()) for axis in (0, 1))  # both axes split weights
    expected = run_on_ranks(_training_fns.dcp_save_on_mesh, 4, path, plan.to_dict(), timeout_seconds=300)[0]
    for r in run_on_ranks(_training_fns.dcp_load, 4, path, timeout_seconds=300):  # a 1-D mesh of 4, its own plan
        assert r["split_params"] > 0
        assert r["out"] == pytest.approx(expected, abs=1e-5)
    model, _ = build_example("gpt", seed=7)  # other weights, no process group in this process
    _, inputs = build_example("gpt")  # the inputs the saving run used
    autotp.load_full_checkpoint(model, path)
    with torch.no_grad():
        assert model(*inputs).flatten().tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_dropout_masks(world_size: int) -> None:
    reports = run_on_ranks(_training_fns.dropout_masks, world_size, timeout_seconds=240)
    first = reports[0]
    assert first["inner_placement"].startswith("S(") and first["outer_placement"] == "R", first
    assert all(r["outer_mask"] == first["outer_mask"] for r in reports)  # replicated: the same mask
    assert 0.3 < sum(first["outer_mask"]) / len(first["outer_mask"]) < 0.7
    assert first["inner_masks_differ"]  # split: each chunk draws its own mask
    assert all(0.3 < r["inner_drop_fraction"] < 0.7 for r in reports)
