"""``autotp.verify`` and ``autotp verify``: the numerical check of a sharded model against the original.

Every case runs real gloo ranks (2, CPU). The check must pass on the built-in examples and on Hugging
Face GPT-2, LLaMA and BERT with plans that really split weights, and must fail on each of five
rewrite bugs injected into the rank-local graph (``tests/_verify_fns.py``) on a GPT whose plan
splits attention and MLPs, where it passes without the bug, on the same model and plan.
"""
from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from torch import nn

import autotp
from autotp.cli import main
from autotp.examples import build_example
from autotp.io.target import builtin_memory_budget
from autotp.ir.placement import R, Shard, local_chunk
from autotp.runtime.verify import TOLERANCES, Comparison, GraphHook, RunResult, VerifyReport, _compare, verify
from tests import _verify_fns

TIMEOUT_S = 240


def _assert_really_sharded(report: VerifyReport) -> None:
    assert report.error is None, report.error
    assert report.split_parameters > 0 and not report.trivial, str(report)
    assert all(local < report.full_elements for local in report.local_elements), str(report)
    assert all(kinds.get("all_reduce", 0) + kinds.get("all_gather", 0) > 0 for kinds in report.collectives), str(report)


@pytest.mark.timeout(2 * TIMEOUT_S)
@pytest.mark.parametrize("name", ["mlp", "llama", "mlp-bf16"])
def test_verify_passes_on_builtin_examples(name: str) -> None:
    model, inputs = build_example(name.removesuffix("-bf16"))
    if name.endswith("-bf16"):
        model = model.to(torch.bfloat16)
        inputs = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs)
    report = verify(model, inputs, mesh_shape=(2,), timeout_seconds=TIMEOUT_S)
    _assert_really_sharded(report)
    assert report.passed, str(report)
    kinds = {c.kind for c in report.comparisons}
    assert {"output", "gradient", "parameter"} <= kinds
    assert sum(c.kind == "gradient" for c in report.comparisons) == len(list(model.parameters()))
    assert "PASS: the sharded model matches the original" in str(report)
    if name.endswith("-bf16"):  # bf16 rounding is above fp32's tolerance: the tolerance follows the dtype
        assert {c.dtype for c in report.comparisons} == {"bfloat16"}
        assert max(c.max_rel for c in report.comparisons) > TOLERANCES[torch.float32]


@pytest.mark.timeout(2 * TIMEOUT_S)
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_verify_passes_on_hugging_face_models(name: str) -> None:
    pytest.importorskip("transformers")
    from tests._hf_fns import build_hf_model

    model, inputs = build_hf_model(name)
    report = verify(model, inputs, mesh_shape=(2,), timeout_seconds=TIMEOUT_S)
    _assert_really_sharded(report)
    assert report.passed, str(report)
    assert [c.name for c in report.comparisons if c.kind == "output"] == ["['logits']"]


@functools.cache
def _gpt_plan() -> autotp.Plan:
    """A plan for the GPT example that splits attention (localised head views) and the MLPs: the
    budget is 60% of the replicated training state."""
    model, inputs = build_example("gpt")
    state_nbytes = builtin_memory_budget(model, 1, training=True, optimizer="adamw")
    return autotp.plan(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget=int(state_nbytes * 0.6))


@pytest.mark.timeout(2 * TIMEOUT_S)
@pytest.mark.parametrize("hook", [None, _verify_fns.correct_reduce_scatter], ids=["as planned", "all-reduce as reduce-scatter + all-gather"])
def test_verify_passes_without_injected_bug(hook: GraphHook | None) -> None:
    """The control for the bug tests below: same model, same plan, a correct graph."""
    model, inputs = build_example("gpt")
    report = verify(model, inputs, plan=_gpt_plan(), graph_hook=hook, timeout_seconds=TIMEOUT_S)
    _assert_really_sharded(report)
    assert report.passed, str(report)
    if hook is not None:
        assert all(kinds.get("reduce_scatter", 0) > 0 for kinds in report.collectives)


@pytest.mark.timeout(2 * TIMEOUT_S)
@pytest.mark.parametrize("bug", list(_verify_fns.BUGS))
def test_verify_fails_on_injected_rewrite_bug(bug: str) -> None:
    model, inputs = build_example("gpt")
    report = verify(model, inputs, plan=_gpt_plan(), graph_hook=_verify_fns.BUGS[bug], timeout_seconds=TIMEOUT_S)
    assert not report.passed, f"verify missed the injected bug '{bug}':\n{report}"
    text = str(report)
    assert "FAIL" in text and "PASS" not in text
    if report.error is None:  # a silent wrong answer: the failing tensors are named
        assert report.failures() and all(f"{c.kind} {c.name}" in text for c in report.failures()[:5])


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_verify_says_when_the_check_is_trivial() -> None:
    """With room for everything the planner keeps the tiny MLP whole: that passes trivially, and
    the table says so instead of a plain PASS."""
    model, inputs = build_example("mlp")
    report = verify(model, inputs, memory_budget="1GiB", training=False, timeout_seconds=TIMEOUT_S)
    assert report.passed and report.trivial, str(report)
    assert report.split_parameters == 0 and report.local_elements == (report.full_elements,) * 2
    assert "PASS, TRIVIALLY" in str(report) and "PASS: the sharded model matches" not in str(report)


def test_comparison_tolerance_depends_on_dtype() -> None:
    """bf16 rounding (4e-3 per operation) passes at bf16 tolerance and fails at fp32's."""
    fp32 = Comparison("output", "y", "float32", "", 4e-3, 4e-3, TOLERANCES[torch.float32])
    bf16 = Comparison("output", "y", "bfloat16", "", 4e-3, 4e-3, TOLERANCES[torch.bfloat16])
    assert not fp32.passed and bf16.passed
    assert not Comparison("output", "y", "float32", "", math.nan, math.nan, 1e-4, "NaN").passed


def test_verify_refuses_meta_models_unpicklable_models_and_plans_that_do_not_fit() -> None:
    meta, meta_inputs = build_example("mlp", device="meta")
    with pytest.raises(autotp.ConfigError, match="meta device"):
        verify(meta, meta_inputs)

    class InsideATest(nn.Linear):
        pass

    with pytest.raises(autotp.ConfigError, match="cannot be pickled.*module level"):
        verify(InsideATest(4, 4), (torch.randn(2, 4),))
    model, inputs = build_example("gpt")
    with pytest.raises(autotp.ConfigError, match="made for 2 ranks.*mesh_shape=\\(2,\\)"):
        verify(model, inputs, mesh_shape=(4,), plan=_gpt_plan())
    llama, llama_inputs = build_example("llama")
    with pytest.raises(autotp.PlanMismatchError, match="graph fingerprint differs"):  # before any rank starts
        verify(llama, llama_inputs, plan=_gpt_plan())


@pytest.mark.timeout(2 * TIMEOUT_S)
def test_cli_verify_exit_codes(tmp_path, capsys) -> None:
    """0 and a table on a pass; 1 when the sharded model differs (here: dropout left on, so every
    run draws its own mask); 2 on a usage error."""
    assert main(["verify", "mlp", "--inference", "--timeout", str(TIMEOUT_S)]) == 0
    out = capsys.readouterr().out
    assert "outputs" in out and "PASS: the sharded model matches the original" in out and "all_reduce" in out

    target = tmp_path / "dropout_model.py"
    target.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build(device='cpu'):\n"
        "    torch.manual_seed(0)\n"
        "    with torch.device(device):\n"
        "        model = nn.Sequential(nn.Linear(32, 128), nn.Dropout(0.5), nn.ReLU(), nn.Linear(128, 32))\n"
        "    return model.train()\n"
    )
    code = main(["verify", f"{target}:build", "--input", "input:float32[4,32]", "--inference", "--timeout", str(TIMEOUT_S)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL: the sharded model differs from the original" in out and "output output" in out

    plan_file = tmp_path / "gpt.plan.json"
    _gpt_plan().save(str(plan_file))
    assert main(["verify", "gpt", "--plan", str(plan_file), "--mesh", "4"]) == 2
    assert "made for 2 ranks" in capsys.readouterr().err


# --- N-D meshes --------------------------------------------------------------------------------
@pytest.mark.timeout(2 * TIMEOUT_S)
def test_cli_verify_on_a_2d_mesh_splits_over_both_axes(capsys: pytest.CaptureFixture[str]) -> None:
    """The MLP example on 4 ranks as a (dp=2, tp=2) mesh, at the default budget (1.3/4 of the
    replicated state): parameters split over both axes, collectives on both, and it matches."""
    code = main(["verify", "mlp", "--mesh", "2x2", "--mesh-axis-names", "dp,tp", "--timeout", str(TIMEOUT_S)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "on 4 CPU ranks as the mesh (dp=2, tp=2)" in out and "PASS: the sharded model matches the original" in out, out
    split = re.search(r"parameters split \(over dp: (\d+), over tp: (\d+)\)", out)
    assert split and int(split[1]) > 0 and int(split[2]) > 0, out
    assert "parameter placements over (dp, tp):" in out and re.search(r"^  \(S\(\d\), S\(\d\)\) x\d+: layers\.", out, re.MULTILINE), out
    ranks = re.findall(r"^  rank \d: (.*)$", out, re.MULTILINE)
    assert len(ranks) == 4 and all("@dp" in r and "@tp" in r for r in ranks), out


def test_2d_comparison_checks_each_rank_against_its_chunk() -> None:
    """On a (2, 2) mesh every rank's tensor is compared with ``local_chunk`` of the original at its
    coordinate: right chunks pass, two ranks' chunks swapped fail, a replica on every rank passes."""
    torch.manual_seed(0)
    mesh_shape, coordinates = (2, 2), [(0, 0), (0, 1), (1, 0), (1, 1)]
    full = {"w": torch.randn(4, 6), "b": torch.randn(6)}
    placements = {"w": (Shard(0), Shard(1)), "b": (R, R)}

    def rank(coordinate: tuple[int, ...], w: torch.Tensor) -> RunResult:
        local = {"w": w, "b": full["b"]}
        return RunResult({}, local, local, placements=placements, coordinate=coordinate)

    reference = RunResult({}, full, full)
    chunks = [local_chunk(full["w"], placements["w"], mesh_shape, c) for c in coordinates]
    good = _compare(reference, [rank(c, w) for c, w in zip(coordinates, chunks)], ["w", "b"], [], mesh_shape=mesh_shape, training=True)
    assert all(c.passed for c in good) and {c.placement for c in good} == {"(S(0), S(1))", "(R, R)"}, good
    swapped = [chunks[0], chunks[2], chunks[1], chunks[3]]
    bad = _compare(reference, [rank(c, w) for c, w in zip(coordinates, swapped)], ["w", "b"], [], mesh_shape=mesh_shape, training=True)
    assert [(c.kind, c.name) for c in bad if not c.passed] == [("gradient", "w"), ("parameter", "w")], bad
    whole = _compare(reference, [rank(c, full["w"]) for c in coordinates], ["w"], [], mesh_shape=mesh_shape, training=True)
    assert "expected (2, 3) (its chunk of (4, 6)) on rank 0" in whole[0].problem, whole


def test_verify_refuses_a_2d_plan_on_another_mesh() -> None:
    model, inputs = build_example("mlp", n_layers=1, d_model=16, d_hidden=32)
    plan = autotp.plan(model, inputs, mesh_shape=(2, 2), mesh_axis_names=("dp", "tp"), hardware="cpu-gloo", training=False)
    with pytest.raises(autotp.ConfigError, match=r"made for the mesh \(dp=2, tp=2\) but mesh_shape is \(4,\); pass mesh_shape=\(2, 2\)"):
        verify(model, inputs, mesh_shape=(4,), plan=plan)
    with pytest.raises(autotp.ConfigError, match=r"names its mesh axes dp, tp but mesh_axis_names is a, b"):
        verify(model, inputs, plan=plan, mesh_axis_names=("a", "b"))
