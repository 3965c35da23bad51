"""A plan leaves autotp and comes back: JSON file -> Plan.load -> parallelize, and torch-tp ->
PyTorch's parallelize_module, each on 2 gloo ranks against the unsharded model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from autotp.api import plan_model
from autotp.cost.model import CostModel, resolve_hardware
from autotp.errors import PlanFormatError, TorchTPExportError
from autotp.io.plan_io import SCHEMA_VERSION
from autotp.io.torch_tp import to_parallelize_plan
from autotp.io.torch_tp_check import check_torch_tp
from autotp.io.torch_tp_export import dumps_torch_tp, export_torch_tp
from autotp.ir.placement import Shard
from autotp.ir.plan import Plan
from autotp.solve.layouts import megatron_pins
from autotp.solve.planner import solve_plan
from autotp.strategies.engine import NodeKind
from autotp.testing import run_on_ranks
from tests._hf_fns import budget_for, build_hf_model
from tests._plan_fns import apply_saved_plan, apply_torch_tp, build_case

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
    assert data["format"] == "autotp.plan" and data["version"] == SCHEMA_VERSION and data["mesh_shape"] == [2] and data["mesh_axis_names"] == ["tp"]
    reports = run_on_ranks(apply_saved_plan, 2, str(path), "gpt", GPT, 2, 16, timeout_seconds=240)
    for report in reports:
        assert report["same_layout"] and report["max_abs_diff"] <= 1e-4, report
    assert reports[0]["split_params"], "the default budget of built-in examples forces some weights to be split"


LLAMA = {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "ffn_hidden": 176, "max_seq_len": 64}
def _pinned_plan(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, within: str = "") -> Plan:
    """A plan with Megatron's column/row linears pinned where their module path contains ``within``
    (``"mlp"``: the MLPs only; ``""``: attention too), the rest as the solver likes."""
    result = plan_model(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget=None, training=False)
    cost = CostModel(resolve_hardware("cpu-gloo"), 2)
    nodes = result.space.by_name()
    pins = {name: s for name, s in megatron_pins(result.space).items() if within in nodes[name].module_path}
    assert pins, f"no Megatron linear in a module path containing {within!r}"
    return solve_plan(result.space, cost, hardware="cpu-gloo", memory_budget=None, pinned=pins)


def _export(case: dict, within: str, tmp_path: Path, *, python: bool = False) -> dict:
    """Plan ``case`` (a built-in example on the meta device, or a tiny HF model) with Megatron's
    linears pinned ``within`` (see ``_pinned_plan``) and
    write its torch-tp JSON next to the case; raises TorchTPExportError where the export refuses.
    ``python``: also check that the ``.py`` form is valid Python with the JSON's styles."""
    model, inputs = build_case(case, device="meta")
    plan = _pinned_plan(model, inputs, within=within)
    path = tmp_path / f"{case['name']}.tp.json"
    path.write_text(dumps_torch_tp(plan, model=model, example_inputs=inputs))
    if python:
        namespace: dict = {}
        exec(compile(dumps_torch_tp(plan, model=model, example_inputs=inputs, python=True), "tp_plan.py", "exec"), namespace)  # noqa: S102
        assert {k: type(v).__name__ for k, v in namespace["PLAN"].items()} == {k: v["style"] for k, v in json.loads(path.read_text())["plan"].items()}
    return {**case, "plan_path": str(path)}


GPT_CASE = {"example": "gpt", "config": GPT, "batch": 2, "seq": 16}
LLAMA_CASE = {"example": "llama", "config": LLAMA, "batch": 2, "seq": 16}


@pytest.mark.timeout(600)
def test_torch_tp_plan_reproduces_outputs_with_parallelize_module(tmp_path: Path) -> None:
    """What the export writes runs equal to the original under parallelize_module on 2 gloo ranks,
    with the planned parameters really split: the MLP example from the CLI, GPT and LLaMA with
    their MLPs split, GPT whose attention takes its head count from the data (-1) with attention
    split too, and a Hugging Face LLaMA (which reshapes with -1) with Megatron's full layout."""
    mlp_path = tmp_path / "mlp.tp.json"
    _autotp(
        "plan", "mlp", "--mesh", "2", "--hardware", "cpu-gloo", "--inference", "--input", "x:float32[2,8,64]",
        *_config_args(MLP), "--format", "torch-tp", "--out", str(mlp_path),
    )
    mlp = json.loads(mlp_path.read_text())
    assert mlp["version"] == 2 and set(mlp) == {"format", "version", "tp_size", "plan"} and mlp["plan"], mlp
    cases = [
        {"name": "mlp", "example": "mlp", "config": MLP, "batch": 2, "seq": 8, "plan_path": str(mlp_path)},
        _export({**GPT_CASE, "name": "gpt"}, "mlp", tmp_path),
        _export({**GPT_CASE, "name": "gpt_heads_from_data", "attention": "heads_from_data"}, "", tmp_path, python=True),
        _export({**LLAMA_CASE, "name": "llama"}, "feed_forward", tmp_path),
        _export({"name": "hf_llama", "hf_model": "llama"}, "", tmp_path),
    ]
    hf_plan = json.loads(Path(cases[-1]["plan_path"]).read_text())["plan"]
    assert hf_plan["model.layers.*.self_attn.q_proj"]["style"] == "ColwiseParallel"
    assert hf_plan["model.layers.*.self_attn.o_proj"]["style"] == "RowwiseParallel"
    reports = run_on_ranks(apply_torch_tp, 2, cases, timeout_seconds=480)
    for report in reports:
        for name, case in report.items():
            assert case["max_abs_diff"] <= 1e-4, (name, case)
    split = reports[0]
    assert split["mlp"]["split_params"]
    assert "blocks.0.mlp.c_fc.weight" in split["gpt"]["split_params"]
    assert not any("attn" in n for n in split["gpt"]["split_params"])
    assert {"blocks.1.attn.q_proj.weight", "blocks.1.attn.c_proj.weight"} <= set(split["gpt_heads_from_data"]["split_params"])
    assert {"layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight"} <= set(split["llama"]["split_params"])
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= set(split["hf_llama"]["split_params"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("case", "within", "match"),
    [
        # attention split, but the example reshapes with its global head count: view(B, T, self.n_head, hd)
        pytest.param(
            {**GPT_CASE, "name": "gpt"}, "",
            r"module 'blocks\.0\.attn' \(.*gpt\.py:\d+: q = self\.q_proj\(x\)\.view\(B, T, self\.n_head", id="gpt",
        ),
        pytest.param(
            {**LLAMA_CASE, "name": "llama"}, "",
            r"module 'layers\.0\.attention' \(.*llama\.py:\d+: q = self\.wq\(x\)\.view", id="llama",
        ),
        # view(B, T, self.n_head, -1) would run, mixing heads: the rank-local shapes give it away
        pytest.param(
            {**GPT_CASE, "name": "gpt_head_dim_from_data", "attention": "head_dim_from_data"}, "",
            r"node 'view'.* in module 'blocks\.0\.attn'.* computes rank-local shape\(s\) \(\(2, 16, 4, 8\),\), "
            r"but the plan's node view has rank-local shape\(s\) \(\(2, 16, 2, 16\),\)",
            id="gpt_head_dim_from_data",
        ),
    ],
)
def test_torch_tp_export_refuses_code_that_is_not_rank_local(case: dict, within: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(TorchTPExportError, match=match):
        _export(case, within, tmp_path)
    assert not (tmp_path / f"{case['name']}.tp.json").exists()


@pytest.mark.timeout(300)
def test_torch_tp_export_refuses_a_plan_the_styles_cannot_express() -> None:
    """The issue's GPT-2 case: a memory budget makes the planner split Hugging Face GPT-2, whose
    Conv1D layers (addmm) no style shards (which Conv1D the optimum splits is the solver's choice),
    and convert layouts outside any styled module. The old
    export wrote the expressible part and listed the rest in a comment, which ran with other
    shapes than the plan; now it refuses, naming the modules."""
    model, inputs = build_hf_model("gpt2")
    plan = plan_model(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget=budget_for(model, 2, 0.25), training=False).plan
    assert any(isinstance(n.strategy.axis(0).output, Shard) for n in plan.nodes if n.kind is NodeKind.STATE), "the budget forces splits"
    with pytest.raises(
        TorchTPExportError,
        match=r"(?s)beyond ColwiseParallel.*module 'transformer\.h\.\d+\.(attn|mlp)\.c_\w+'.* read by aten\.addmm\.default outside a styled module.*"
        r"What to do: run this plan with autotp\.parallelize",
    ):
        dumps_torch_tp(plan, model=model, example_inputs=inputs)


@pytest.mark.timeout(300)
def test_cli_torch_tp_refusal_is_one_error_line() -> None:
    """`autotp plan gpt --format torch-tp` under the default budget: exit 2 and the reason, no file, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "autotp.cli", "plan", "gpt", "--mesh", "2", "--hardware", "cpu-gloo", "--input", "idx:int64[2,16]",
         *_config_args(GPT), "--format", "torch-tp"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    assert done.stderr.startswith("autotp: error: cannot export this plan for parallelize_module") and "Traceback" not in done.stderr
    assert "module 'blocks.0.ln_1'" in done.stderr


def test_to_parallelize_plan_refuses_a_version_1_file() -> None:
    """A version-1 file may hold a partial plan (the rest in not_expressible): it is not applied."""
    data = {"format": "autotp.torch_tp", "version": 1, "tp_size": 2, "plan": {}, "not_expressible": [{"module": "lm_head"}]}
    with pytest.raises(PlanFormatError, match="version-1 file may hold a partial plan"):
        to_parallelize_plan(data)


@pytest.mark.timeout(300)
def test_torch_tp_check_refuses_an_output_left_split() -> None:
    """The GPT-2 symptom, (1, 16, 256) per rank instead of (2, 16, 256): a style whose
    output_layouts leaves the last module's output batch-split hands each rank its shard. Written
    by hand into an otherwise valid export, the check refuses it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    inputs = (torch.randn(2, 16, 64),)
    plan = _pinned_plan(model, inputs)
    tp = export_torch_tp(plan, model=model, example_inputs=inputs)
    assert {k: v.style for k, v in tp.styles.items()} == {"0": "ColwiseParallel", "2": "RowwiseParallel"}
    batch_split = replace(tp, styles={**tp.styles, "2": replace(tp.styles["2"], output_layouts=Shard(0))})
    with pytest.raises(TorchTPExportError, match=r"each rank returns outputs of shape\(s\) \(\(1, 16, 64\),\), the model returns \(\(2, 16, 64\),\)"):
        check_torch_tp(batch_split, plan=plan, model=model, example_inputs=inputs)


class _FunctionalLinear(nn.Module):
    """``F.linear`` on its own weight: one linear op, like ``nn.Linear``, but no style shards it."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


def test_torch_tp_export_refuses_a_style_on_a_module_it_cannot_shard() -> None:
    model = nn.Sequential(_FunctionalLinear(64, 256), nn.GELU(), nn.Linear(256, 64))
    inputs = (torch.randn(2, 16, 64),)
    plan = _pinned_plan(model, inputs)
    with pytest.raises(TorchTPExportError, match=r"module '0' is a _FunctionalLinear, and ColwiseParallel shards nn\.Linear and nn\.Embedding only"):
        export_torch_tp(plan, model=model, example_inputs=inputs)
