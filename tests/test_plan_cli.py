"""`autotp plan` and `autotp explain` through the real console script, in a subprocess."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import autotp
from autotp.cli import build_parser, main
from autotp.ir.mesh import MeshSpec

SMALL_GPT = ["--mesh", "4", "--input", "idx:int64[2,32]", "--config", "n_layer=3", "--config", "n_embd=128", "--config", "n_head=4", "--config", "vocab_size=512", "--config", "block_size=64"]


def autotp_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("autotp")
    assert exe, "the autotp console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=False)


def _ok(*args: str) -> subprocess.CompletedProcess:
    done = autotp_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


@pytest.mark.timeout(180)
def test_plan_gpt_alone_prints_the_table() -> None:
    done = _ok("plan", "gpt")
    out = done.stdout
    assert "GPT-2 small" in out and "mesh (8,) on h100-sxm, training (adamw)" in out
    assert re.search(r"^blocks\.\d+-\d+ ×\d+", out, re.MULTILINE), out[:3000]  # identical blocks collapsed
    assert re.search(r"^  attn\.q_proj\s+linear\s+\[", out, re.MULTILINE)
    for needle in ("totals (per step, per device)", "this plan", "replicate-all", "Megatron-LM", "memory per device", "priced without it"):
        assert needle in out, needle


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "gpt.plan.json"
    _ok("plan", "gpt", *SMALL_GPT, "--format", "json", "--out", str(path))
    return path


@pytest.mark.timeout(180)
def test_json_format_loads(plan_file: Path) -> None:
    plan = autotp.Plan.load(str(plan_file))
    data = json.loads(plan_file.read_text())
    assert plan.tp_size == 4 and plan.training and data["source"] == {"target": "gpt", "model": "GPT"}
    assert plan.memory_budget is not None and plan.memory_nbytes_per_device <= plan.memory_budget


@pytest.mark.timeout(180)
def test_saved_plan_renders_in_every_format(plan_file: Path, tmp_path: Path) -> None:
    """--plan FILE: no solve; the saved plan is checked against the target and rendered."""
    dot = _ok("plan", "gpt", *SMALL_GPT, "--plan", str(plan_file), "--format", "dot").stdout
    assert dot.startswith("digraph autotp_plan {") and "subgraph cluster_" in dot
    html_path = tmp_path / "plan.html"
    done = _ok("plan", "gpt", *SMALL_GPT, "--plan", str(plan_file), "--format", "html", "--out", str(html_path))
    assert f"wrote html to {html_path}" in done.stderr
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and 'id="totals"' in page
    # This plan splits weights where no parallelize_module style converts: the export refuses, naming them.
    py_path = tmp_path / "tp_plan.py"
    refused = autotp_cli("plan", "gpt", *SMALL_GPT, "--plan", str(plan_file), "--format", "torch-tp", "--out", str(py_path))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.startswith("autotp: error: cannot export this plan for parallelize_module") and "module '" in refused.stderr
    assert not py_path.exists()


@pytest.mark.timeout(120)
def test_explain_module() -> None:
    out = _ok("explain", "gpt", *SMALL_GPT, "--module", "blocks.1.mlp.c_fc").stdout
    assert "node 'linear_10' (aten.linear.default) in 'blocks.1.mlp.c_fc'" in out
    assert re.search(r"^\*\s+\[", out, re.MULTILINE) and "chosen:" in out and "why:" in out
    assert "compute" in out and "inputs" in out and "outputs" in out


def _edit_plan(plan_file: Path, tmp_path: Path, edit) -> str:
    data = json.loads(plan_file.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return str(path)


def _bad_json(plan_file: Path, tmp_path: Path) -> str:
    path = tmp_path / "broken.json"
    path.write_text(plan_file.read_text()[:200])
    return str(path)


ERRORS = {
    "fingerprint-mismatch": (lambda f, t: ["plan", "gpt", *SMALL_GPT, "--config", "n_embd=64", "--plan", str(f)],
                             r"the plan does not fit this model \(graph fingerprint differs\): op 0 is 'p_wpe_weight"),
    "malformed-json": (lambda f, t: ["plan", "gpt", "--plan", _bad_json(f, t)], r"is not valid JSON"),
    "unknown-field": (lambda f, t: ["plan", "gpt", "--plan", _edit_plan(f, t, lambda d: d.update(colour="red"))], r"unknown field 'colour'"),
    "schema-version": (lambda f, t: ["plan", "gpt", "--plan", _edit_plan(f, t, lambda d: d.update(version=7))], r"schema version 7 is not supported"),
    "unknown-hardware": (lambda f, t: ["plan", "gpt", "--hardware", "h200-imaginary"], r"h200-imaginary"),
    "bad-input": (lambda f, t: ["plan", "gpt", "--input", "idx:int64(8,1024)"], r"cannot read --input 'idx:int64\(8,1024\)': expected NAME:DTYPE\[SHAPE\]"),
}

# The same contract in-process, through autotp.cli.main (no interpreter start-up to pay for).
IN_PROCESS_ERRORS = {
    "bad-mesh": (["plan", "gpt", "--mesh", "2x"], r"cannot read --mesh '2x': expected ranks per mesh axis such as 8 or 2x4"),
    "bad-axis-names": (["verify", "mlp", "--mesh", "2x4", "--mesh-axis-names", "dp"], r"cannot read --mesh-axis-names 'dp': expected 2 distinct"),
    "bad-axis-role": (["plan", "gpt", "--mesh", "2x4", "--axis-role", "axis0=tensor"], r"cannot read --axis-role 'axis0=tensor': expected AXIS=ROLE.*any, data, fsdp"),
    "axis-role-without-role": (["explain", "gpt", "--mesh", "2x4", "--axis-role", "dp", "--node", "x"], r"cannot read --axis-role 'dp'"),
    "axis-role-unknown-axis": (["plan", "gpt", "--mesh", "2x4", "--mesh-axis-names", "dp,tp", "--axis-role", "pp=data"],
                               r"--axis-role pp=data: no mesh axis 'pp'; the mesh \(dp=2, tp=4\) has axes dp, tp"),
    "inter-node-unknown-axis": (["verify", "mlp", "--mesh", "2x2", "--inter-node-axes", "dp"], r"--inter-node-axes dp: no mesh axis 'dp'.*--mesh-axis-names"),
    "unknown-target": (["plan", "gtp"], r"unknown target 'gtp'"),
    "unknown-node": (["explain", "mlp", "--config", "n_layers=1", "--config", "d_model=64", "--config", "d_hidden=128",
                      "--input", "x:float32[2,4,64]", "--mesh", "2", "--node", "linaer"], r"no node named 'linaer'.*did you mean"),
    "bad-config": (["plan", "gpt", "--config", "n_layers=2"], r"cannot build the 'gpt' example: GPTConfig has no field 'n_layers'"),
}


@pytest.fixture(scope="module")
def error_runs(plan_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every error case at once: they are independent processes that mostly import torch."""
    tmp = tmp_path_factory.mktemp("errors")
    args = {case: make_args(plan_file, tmp / case) for case, (make_args, _) in ERRORS.items() if (tmp / case).mkdir() is None}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(autotp_cli, *a) for case, a in args.items()}
        return {case: f.result() for case, f in futures.items()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_without_traceback(case: str, error_runs: dict[str, subprocess.CompletedProcess]) -> None:
    _, message = ERRORS[case]
    done = error_runs[case]
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotp: error: "), done.stderr[-3000:]
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(IN_PROCESS_ERRORS))
def test_errors_in_process(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = IN_PROCESS_ERRORS[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autotp: error: ") and re.search(message, err[0]), err


SMALL_MLP = ["--config", "n_layers=2", "--config", "d_model=64", "--config", "d_hidden=128", "--input", "x:float32[2,4,64]"]


def test_plan_on_a_2d_mesh_writes_and_reads_the_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--mesh 2x2 with axis names, a role and an inter-node axis: the JSON plan keeps the mesh, and --plan reads it back."""
    path = tmp_path / "mlp.plan.json"
    mesh_flags = ["--mesh", "2x2", "--mesh-axis-names", "dp,tp", "--axis-role", "tp=fsdp", "--inter-node-axes", "dp"]
    assert main(["plan", "mlp", *SMALL_MLP, *mesh_flags, "--format", "json", "--out", str(path), "-q"]) == 0
    plan = autotp.Plan.load(str(path))
    assert plan.mesh == MeshSpec((2, 2), ("dp", "tp"), (0,)), plan.mesh
    params = [n for n in plan.nodes if n.name.startswith("p_") and n.name.endswith("weight")]
    assert params and all(isinstance(n.strategy.output[1], autotp.Shard) for n in params), [str(n.strategy) for n in params]  # fsdp on tp
    capsys.readouterr()
    assert main(["plan", "mlp", *SMALL_MLP, "--plan", str(path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "mesh (dp=2, tp=2) on h100-sxm" in out and "(S(" in out, out[:2000]
    assert main(["explain", "mlp", *SMALL_MLP, "--plan", str(path), "--module", "layers.0.fc1", "-q"]) == 0
    assert "mesh (dp=2, tp=2)" in capsys.readouterr().out


def test_plan_help_through_the_script() -> None:
    done = autotp_cli("plan", "--help", timeout=60)
    assert done.returncode == 0 and "usage: autotp plan" in done.stdout and "--format" in done.stdout


@pytest.mark.parametrize("command", ["plan", "explain", "demo"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "usage: autotp " + command in out
    if command != "demo":
        for option in ("--mesh", "--mesh-axis-names", "--axis-role", "--inter-node-axes", "--hardware", "--input", "--memory-budget", "--inference", "--optimizer", "--plan"):
            assert option in out, option
