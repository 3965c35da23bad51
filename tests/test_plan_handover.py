"""A plan leaves autotp and comes back: JSON file -> Plan.load -> parallelize, and torch-tp ->
PyTorch's parallelize_module, each on 2 gloo ranks against the unsharded model."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from autotp.api import plan_model, resolve_hardware
from autotp.cost import CostModel
from autotp.examples import build_example
from autotp.layouts import megatron_pins
from autotp.plan import build_plan
from autotp.solve import solve
from autotp.testing import run_on_ranks
from autotp.torch_tp import dumps_torch_tp
from tests._plan_fns import apply_saved_plan, apply_torch_tp

GPT = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256, "block_size": 64}
MLP = {"d_model": 64, "d_hidden": 256, "n_layers": 2}


def _config_args(config: dict) -> list[str]:
    return [arg for k, v in config.items() for arg in ("--config", f"{k}={v}")]


def _autotp(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("autotp")
    assert exe, "the autotp console script is not installed (pip install -e .)"
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.timeout(300)
def test_json_round_trip_applies_on_two_ranks(tmp_path: Path) -> None:
    """`autotp plan --format json` -> Plan.load -> parallelize(plan=) reproduces the original outputs."""
    path = tmp_path / "gpt.plan.json"
    _autotp("plan", "gpt", "--mesh", "2", "--hardware", "cpu-gloo", "--input", "idx:int64[2,16]", *_config_args(GPT), "--format", "json", "--out", str(path))
    data = json.loads(path.read_text())
    assert data["format"] == "autotp.plan" and data["version"] == 1 and data["mesh_shape"] == [2]
    reports = run_on_ranks(apply_saved_plan, 2, str(path), "gpt", GPT, 2, 16, timeout_seconds=240)
    for report in reports:
        assert report["same_layout"] and report["max_abs_diff"] <= 1e-4, report
    assert reports[0]["split_params"], "the default budget of built-in examples forces some weights to be split"


def _megatron_gpt_plan(tmp_path: Path) -> Path:
    """GPT with Megatron's layout pinned: every linear column/row split, the rest as the solver likes."""
    model, inputs = build_example("gpt", device="meta", **GPT)
    result = plan_model(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget=None, training=False)
    cost = CostModel(resolve_hardware("cpu-gloo"), 2)
    pins = megatron_pins(result.space)
    plan = build_plan(result.space, solve(result.space, cost, pinned=pins), cost, hardware="cpu-gloo", memory_budget=None)
    path = tmp_path / "gpt.tp.json"
    path.write_text(dumps_torch_tp(plan))
    return path


@pytest.mark.timeout(300)
def test_torch_tp_plan_reproduces_outputs_with_parallelize_module(tmp_path: Path) -> None:
    mlp_path = tmp_path / "mlp.tp.json"
    _autotp(
        "plan", "mlp", "--mesh", "2", "--hardware", "cpu-gloo", "--inference", "--input", "x:float32[2,8,64]",
        *_config_args(MLP), "--format", "torch-tp", "--out", str(mlp_path),
    )
    mlp = json.loads(mlp_path.read_text())
    assert mlp["not_expressible"] == [] and mlp["plan"], mlp
    gpt_path = _megatron_gpt_plan(tmp_path)
    gpt = json.loads(gpt_path.read_text())
    assert gpt["not_expressible"] == []
    assert {spec["style"] for spec in gpt["plan"].values()} == {"ColwiseParallel", "RowwiseParallel"}
    assert any("reshapes a split tensor" in note for note in gpt["notes"])  # why the test adjusts n_head
    cases = [
        {"name": "mlp", "example": "mlp", "config": MLP, "batch": 2, "seq": 8, "plan_path": str(mlp_path)},
        {"name": "gpt", "example": "gpt", "config": GPT, "batch": 2, "seq": 16, "plan_path": str(gpt_path)},
    ]
    reports = run_on_ranks(apply_torch_tp, 2, cases, timeout_seconds=240)
    for report in reports:
        for name, case in report.items():
            assert case["max_abs_diff"] <= 1e-4, (name, case)
    assert reports[0]["mlp"]["split_params"]
    assert any(n.endswith("q_proj.weight") for n in reports[0]["gpt"]["split_params"])
