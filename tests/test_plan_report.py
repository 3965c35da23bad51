"""Reading a plan: the grouped table, baselines, torch-tp hand-over, `explain` and CLI targets. One process."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import autotp
from autotp.api import plan_model
from autotp.cli.commands.plan import parse_mesh
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.io.target import builtin_memory_budget, load_target, parse_config, parse_input
from autotp.io.torch_tp import torch_tp_plan
from autotp.io.torch_tp_export import dumps_torch_tp
from autotp.ir.placement import R, Shard
from autotp.report.explain import explain_node, find_nodes, format_explanation
from autotp.report.render import to_dot, to_html
from autotp.report.table import format_table, layout_sections, price_baselines
from autotp.solve.build import build_plan
from autotp.solve.ilp import solve
from autotp.solve.layouts import megatron_pins
from autotp.solve.planner import replicate_all
from autotp.strategies.engine import NodeKind


def _cost(tp: int, training: bool = True) -> CostModel:
    return CostModel(resolve_hardware("h100-sxm"), tp, training=training, optimizer="adamw" if training else None)


@pytest.fixture(scope="module")
def gpt4():
    """GPT, 4 blocks at n_embd 256, 4 ranks, training, under a budget that forces splits."""
    model, inputs = build_example("gpt", device="meta", batch=4, seq=64, n_layer=4, n_embd=256, n_head=8, vocab_size=1024)
    budget = builtin_memory_budget(model, 4, training=True, optimizer="adamw")
    return plan_model(model, inputs, mesh_shape=(4,), hardware="h100-sxm", memory_budget=budget), budget


def test_identical_blocks_collapse(gpt4) -> None:
    result, _ = gpt4
    sections = layout_sections(result.plan)
    blocks = [s for s in sections if s.container == "blocks"]
    assert sum(s.count for s in blocks) == 4
    assert any(s.count > 1 and re.fullmatch(r"blocks\.\d+-\d+ ×\d+", s.label) for s in blocks), [s.label for s in sections]
    shown = {r.node.name for s in sections for r in s.rows}
    for node in result.plan.nodes:  # every op that computes or communicates is in the table
        if node.kind is NodeKind.OP and (node.compute_seconds > 0 or node.conversions):
            assert node.name in shown or any(s.count > 1 for s in blocks)


def test_table_has_rows_and_totals_against_baselines(gpt4) -> None:
    result, budget = gpt4
    baselines = price_baselines(result.space, _cost(4), hardware="h100-sxm", memory_budget=budget)
    names = [b.name for b in baselines]
    assert names == ["replicate-all", "Megatron-LM"]
    replicated, megatron = baselines[0].plan, baselines[1].plan
    assert replicated.comm_seconds == 0 and replicated.memory_nbytes_per_device > budget
    assert "over the" in baselines[0].note and "priced without it" in baselines[0].note
    assert "24 linears pinned by graph structure (4 attentions, 4 MLPs)" in baselines[1].note
    if megatron.memory_nbytes_per_device <= budget:  # within budget the ILP never loses to the hand layout
        assert result.plan.total_seconds <= megatron.total_seconds * (1 + 1e-9)
    text = format_table(result.plan, baselines, title="t")
    for needle in ("module", "placements", "collective", "est. time", "attn.q_proj", "linear", "totals (per step, per device)",
                   "compute", "communication", "memory per device", "replicate-all", "Megatron-LM"):
        assert needle in text, needle
    assert re.search(r"all_reduce|reduce_scatter|all_gather", text)


def test_replicate_all_pins_every_node(gpt4) -> None:
    result, _ = gpt4
    plan = replicate_all(result.space, _cost(4), hardware="h100-sxm")
    assert all(p == (R,) for n in plan.nodes for p in (*n.strategy.inputs, *n.strategy.outputs))
    pinned = {n.name: n.strategy for n in plan.nodes}  # the same as the ILP with every node pinned
    assert build_plan(result.space, solve(result.space, _cost(4), pinned=pinned).chosen(result.space), _cost(4), hardware="h100-sxm", memory_budget=None).total_seconds == pytest.approx(plan.total_seconds)


def test_dot_and_html_render(gpt4) -> None:
    result, _ = gpt4
    dot = to_dot(result.plan, title="gpt")
    assert dot.startswith("digraph autotp_plan {") and "subgraph cluster_" in dot and dot.rstrip().endswith("}")
    assert re.search(r'-> "\w+" \[color="#d62728"', dot)  # a collective edge
    page = to_html(result.plan, price_baselines(result.space, _cost(4), hardware="h100-sxm", memory_budget=None), title="gpt")
    assert page.count('class="op"') >= 10 and 'class="collective"' in page and 'id="totals"' in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained


def test_explain_prices_every_candidate_exactly(gpt4) -> None:
    """compute + inputs + outputs of a candidate is the change in the plan's total if that node alone switched."""
    result, _ = gpt4
    space, plan, cost = result.space, result.plan, _cost(4)
    base_choice = {n.name: n.strategies.index(plan.node(n.name).strategy) for n in space.nodes}
    checked = 0
    for node in find_nodes(space, module="blocks.1.mlp.c_proj") + find_nodes(space, node="layer_norm_3"):
        exp = explain_node(space, plan, cost, node.name)
        assert exp.chosen.total_seconds == min(c.total_seconds for c in exp.candidates)
        assert "cheapest" in exp.verdict or "only candidate" in exp.verdict or "budget" in exp.verdict
        for cand in exp.candidates:
            if not cand.feasible:
                continue
            choice = dict(base_choice, **{node.name: cand.index})
            switched = build_plan(space, {n.name: n.strategies[choice[n.name]] for n in space.nodes}, cost, hardware="h100-sxm", memory_budget=None)
            assert switched.total_seconds - plan.total_seconds == pytest.approx(cand.total_seconds - exp.chosen.total_seconds, rel=1e-6, abs=1e-12)
            checked += 1
    assert checked >= 6
    text = format_explanation(explain_node(space, plan, cost, "linear_4"))
    assert "chosen:" in text and "why:" in text and "*" in text


def test_explain_unknown_node_suggests_names(gpt4) -> None:
    with pytest.raises(autotp.ConfigError, match=r"no node named 'linaer_4'.*did you mean linear_4"):
        find_nodes(gpt4[0].space, node="linaer_4")


def test_torch_tp_megatron_layout_is_fully_expressible() -> None:
    model, inputs = build_example("gpt", device="meta")
    result = plan_model(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget=None, training=False)
    cost = CostModel(resolve_hardware("cpu-gloo"), 2)
    pins = megatron_pins(result.space)
    plan = build_plan(result.space, solve(result.space, cost, pinned=pins).chosen(result.space), cost, hardware="cpu-gloo", memory_budget=None)
    tp = torch_tp_plan(plan)
    assert tp.complete
    assert {k: v.style for k, v in tp.styles.items()} == {
        "blocks.*.attn.q_proj": "ColwiseParallel", "blocks.*.attn.k_proj": "ColwiseParallel", "blocks.*.attn.v_proj": "ColwiseParallel",
        "blocks.*.attn.c_proj": "RowwiseParallel", "blocks.*.mlp.c_fc": "ColwiseParallel", "blocks.*.mlp.c_proj": "RowwiseParallel",
    }
    assert tp.styles["blocks.*.attn.c_proj"].output_layouts == R and tp.styles["blocks.*.mlp.c_fc"].output_layouts == Shard(2)
    # expressible, but the example reshapes with its global head count: the export refuses (tests/test_plan_handover.py)
    with pytest.raises(autotp.errors.TorchTPExportError, match=r"module 'blocks\.0\.attn'"):
        dumps_torch_tp(plan, model=model, example_inputs=inputs, python=True)


def test_torch_tp_lists_what_it_cannot_express() -> None:
    """A batch-split linear has no module style: it is listed, with why."""
    model, inputs = build_example("mlp", device="meta", batch=8, seq=4)
    result = plan_model(model, inputs, mesh_shape=(2,), hardware="h100-sxm", memory_budget=None, training=False)
    cost = CostModel(resolve_hardware("h100-sxm"), 2)
    space = result.space
    pins = {}
    for node in space.nodes:
        if node.op.startswith("aten.linear"):
            pins[node.name] = next(s for s in node.strategies if s.inputs[0] == (Shard(0),) and s.inputs[1] == (R,))
    plan = build_plan(space, solve(space, cost, pinned=pins).chosen(space), cost, hardware="h100-sxm", memory_budget=None)
    tp = torch_tp_plan(plan)
    assert not tp.complete and not tp.styles
    assert any("neither column- nor row-parallel" in p["why"] for p in tp.not_expressible)


def test_parse_input_mesh_and_config() -> None:
    spec = parse_input("input_ids:int64[8,2048]")
    assert (spec.name, spec.dtype, spec.shape) == ("input_ids", torch.int64, (8, 2048))
    assert parse_input("x:bf16[2, 3, 4]").dtype == torch.bfloat16
    for bad, message in [("input_ids:int64", "expected NAME:DTYPE\\[SHAPE\\]"), ("x:complex9[2]", "unknown dtype"), ("x:int64[0,2]", "positive")]:
        with pytest.raises(autotp.ConfigError, match=message):
            parse_input(bad)
    assert parse_mesh("8") == (8,) and parse_mesh("2x4") == (2, 4) and parse_mesh("2 x 2 x 2") == (2, 2, 2)
    for bad, message in [("2x", r"cannot read --mesh '2x': expected ranks per mesh axis"), ("2x0", r"--mesh must be at least 1 on every axis")]:
        with pytest.raises(autotp.ConfigError, match=message):
            parse_mesh(bad)
    assert parse_config(["n_layer=4", "bias=false", "dropout=0.1", "name=x"]) == {"n_layer": 4, "bias": False, "dropout": 0.1, "name": "x"}


def test_file_target_is_built_on_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "mymodel.py"
    source.write_text(
        "import torch\n"
        "def build(device='cpu', width=32):\n"
        "    with torch.device(device):\n"
        "        return torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))\n"
    )
    target = load_target(f"{source}:build", inputs=[parse_input("input:float32[4,16,64]")], config={"width": 64})
    assert all(p.is_meta for p in target.model.parameters())
    assert target.example_inputs[0].shape == (4, 16, 64) and target.example_inputs[0].is_meta
    with pytest.raises(autotp.ConfigError, match=r"returned only a model: give its example inputs with --input"):
        load_target(f"{source}:build")
    with pytest.raises(autotp.ConfigError, match=r"has no function 'nope'"):
        load_target(f"{source}:nope")
    with pytest.raises(autotp.ConfigError, match=r"unknown target 'gtp'"):
        load_target("gtp")
    monkeypatch.syspath_prepend(str(tmp_path))
    module_target = load_target("mymodel:build", inputs=[parse_input("input:float32[2,8,32]")])
    assert module_target.model_name == "Sequential" and all(p.is_meta for p in module_target.model.parameters())


def test_builtin_defaults_force_a_split() -> None:
    target = load_target("gpt")
    assert target.example_inputs[0].shape == (8, 1024) and all(p.is_meta for p in target.model.parameters())
    replicated = sum(p.numel() * 4 for p in target.model.parameters()) * 4  # weights, grads, two AdamW moments
    assert builtin_memory_budget(target.model, 8, training=True, optimizer="adamw") == int(replicated * 1.3 / 8)


def test_torch_tp_sequence_parallel_norms() -> None:
    """Megatron with sequence parallelism: norms on S(1) become SequenceParallel (leaf modules only),
    the linears around them take and give S(1)."""
    model, inputs = build_example("gpt", device="meta", batch=2, seq=16)
    result = plan_model(model, inputs, mesh_shape=(2,), hardware="h100-sxm", memory_budget=None, training=False)
    pins = megatron_pins(result.space)
    for node in result.space.nodes:
        if node.op.startswith("aten.layer_norm") and node.module_path.startswith("blocks"):
            pins[node.name] = next(s for s in node.strategies if s.inputs[0] == (Shard(1),) and s.output == (Shard(1),))
    cost = CostModel(resolve_hardware("h100-sxm"), 2)
    plan = build_plan(result.space, solve(result.space, cost, pinned=pins).chosen(result.space), cost, hardware="h100-sxm", memory_budget=None)
    styles = torch_tp_plan(plan).styles
    assert styles["blocks.*.ln_1"].style == "SequenceParallel" and styles["blocks.*.ln_2"].style == "SequenceParallel"
    assert styles["blocks.*.attn.q_proj"].input_layouts == Shard(1)
    assert styles["blocks.*.mlp.c_proj"].output_layouts == Shard(1)
    assert not any(re.fullmatch(r"blocks\.\d+", path) for path in styles)  # never a whole block


def test_torch_tp_refuses_an_n_d_plan() -> None:
    """parallelize_module's styles shard over a 1-D mesh: a (dp, tp) plan is refused, saying so."""
    model, inputs = build_example("mlp", device="meta", batch=4, seq=4, d_model=32, d_hidden=64)
    plan = autotp.plan(model, inputs, mesh_shape=(2, 2), mesh_axis_names=("dp", "tp"), hardware="h100-sxm", training=False)
    with pytest.raises(autotp.ConfigError, match=r"cannot export a plan for the 2-D mesh \(dp=2, tp=2\) as a parallelize_module plan: .*1-D mesh only"):
        torch_tp_plan(plan)
    with pytest.raises(autotp.ConfigError, match=r"2-D mesh"):
        dumps_torch_tp(plan, model=model, example_inputs=inputs)
