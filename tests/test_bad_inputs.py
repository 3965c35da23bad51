"""Bad and unusual inputs (issue 21): each is a typed ``AutoTPError`` naming what is wrong and what
to do, or a correct result; never a raw traceback from deep inside, a hang, or an abort.

In-process cases (capture, planning, plan and profile files, the checkpoint functions, the CLI)
are one table; the multi-rank cases run in one spawn of 3 ranks (``tests/_bad_inputs_fns.py``),
whose per-case outcomes a module-scoped fixture hands to the assertions.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import autotp
from autotp.cli import main as cli_main
from autotp.errors import SolverTimeLimitWarning
from autotp.io.plan_io import dumps_plan
from autotp.io.target import load_target
from autotp.testing import run_on_ranks
from tests import _bad_inputs_fns

WIDTH = 16


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(input_ids) * attention_mask


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


class Branches(nn.Module):
    """Data-dependent control flow: a Python ``if`` on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:
            return h * 2
        return h


class ReadsItem(nn.Module):
    """``.item()`` used as a size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = int(x.abs().max().item() * 4)
        return self.fc(x)[:, :keep]


class UsesNumpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.fc(x).detach().numpy() * 2)


class Box:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class ReturnsObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> Box:
        return Box(self.fc(x))


def x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape or (4, WIDTH), generator=torch.Generator().manual_seed(0))


def plan_of(model: nn.Module, inputs: Any, **kwargs: Any) -> autotp.Plan:
    return autotp.plan(model, inputs, **{"mesh_shape": 2, "hardware": "cpu-gloo", "training": False, **kwargs})


def meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return MLP()


def plan_meta(**kwargs: Any) -> autotp.Plan:
    return plan_of(meta_mlp(), (x().to("meta"),), **kwargs)


# ------------------------------------------------------------------------------------------
# plan files


def _good_plan_dict() -> dict[str, Any]:
    return json.loads(dumps_plan(plan_meta()))


def _load_plan_file(tmp: Path, content: bytes | str) -> None:
    path = tmp / "plan.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    autotp.Plan.load(str(path))


def _load_edited_plan(tmp: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    data = _good_plan_dict()
    edit(data)
    _load_plan_file(tmp, json.dumps(data))


def _plan_with_hardware(tmp: Path, content: str | bytes, name: str = "profile.toml") -> None:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    plan_meta(hardware=str(path))


# (id, action on tmp_path, error type, regex the message must match)
Case = tuple[str, Callable[[Path], object], type[BaseException], str]

CASES: list[Case] = [
    # uncapturable models
    ("data-dependent-if", lambda t: plan_of(Branches(), (x(),)), autotp.CaptureError, r"Branches.*branches on or reads a tensor's values.*torch\.cond"),
    ("item-as-size", lambda t: plan_of(ReadsItem(), (x(),)), autotp.CaptureError, r"ReadsItem.*\.item\(\).*move that data-dependent"),
    ("numpy", lambda t: plan_of(UsesNumpy(), (x(),)), autotp.CaptureError, r"UsesNumpy.*leaves torch for numpy.*use torch ops"),
    ("non-tensor-output", lambda t: plan_of(ReturnsObject(), (x(),)), autotp.CaptureError, r"returns an object of type Box, which is not a tensor.*return only tensors"),
    ("not-a-module", lambda t: plan_of(lambda v: v, (x(),)), autotp.CaptureError, r"expected an nn\.Module, got function"),
    ("inputs-a-list", lambda t: plan_of(MLP(), [x()]), autotp.CaptureError, r"must be a tuple of tensors, got list; wrap a single tensor as \(x,\)"),
    # forward called wrongly
    ("missing-argument", lambda t: plan_of(TwoInputs(), (x(),)), autotp.CaptureError,
     r"missing a required argument: 'attention_mask'.*forward\(\) takes input_ids, attention_mask; example_inputs gave 1 tensor \(float32\[4, 16\]\)"),
    ("extra-argument", lambda t: plan_of(MLP(), (x(), x())), autotp.CaptureError, r"too many positional arguments.*forward\(\) takes x; example_inputs gave 2 tensors"),
    ("float-into-embedding", lambda t: plan_of(Embedder(), (x(2, 3),)), autotp.CaptureError, r"'indices'.*float32\[2, 3\].*rejects one's dtype.*int64 token ids for nn\.Embedding"),
    ("wrong-width", lambda t: plan_of(MLP(), (x(4, 5),)), autotp.CaptureError, r"float32\[4, 5\].*rejects one's shape.*in_features"),
    # plan files
    ("plan-binary", lambda t: _load_plan_file(t, bytes(range(256))), autotp.PlanFormatError, r"plan\.json' is not a text file \(byte 128 is not UTF-8\).*Plan\.save"),
    ("plan-empty", lambda t: _load_plan_file(t, ""), autotp.PlanFormatError, r"plan\.json' is empty: a plan is the JSON written by"),
    ("plan-truncated", lambda t: _load_plan_file(t, dumps_plan(plan_meta())[:200]), autotp.PlanFormatError, r"plan\.json' is not valid JSON: .* line \d+ column \d+"),
    ("plan-other-json", lambda t: _load_plan_file(t, '{"model": "gpt2", "layers": 12}'), autotp.PlanFormatError, r"plan\.json': not an autotp plan: it has no field 'format' \(its fields: 'model', 'layers'\)"),
    ("plan-newer-schema", lambda t: _load_edited_plan(t, lambda d: d.update(version=99)), autotp.PlanFormatError, r"version 99 is not supported.*newer autotp \(upgrade autotp, or re-plan"),
    ("plan-older-schema", lambda t: _load_edited_plan(t, lambda d: d.update(version=0)), autotp.PlanFormatError, r"version 0 is not supported.*re-plan with this autotp"),
    ("plan-wrong-schema", lambda t: _load_edited_plan(t, lambda d: d.update(nodes={"a": 1})), autotp.PlanFormatError, r"field 'nodes' must be a list, got an object"),
    ("plan-placement-axes", lambda t: _load_edited_plan(t, lambda d: d["nodes"][0]["strategy"].update(output="(R, R)")), autotp.PlanFormatError,
     r"nodes\[0\]\.strategy\.output: '\(R, R\)' has 2 placements but the mesh has 1 axis"),
    ("plan-directory", lambda t: autotp.Plan.load(str(t)), autotp.PlanFormatError, r"cannot read plan file .*: Is a directory"),
    ("plan-missing", lambda t: autotp.Plan.load(str(t / "absent.json")), autotp.PlanFormatError, r"cannot read plan file .*absent\.json': No such file"),
    # hardware profile files
    ("profile-json", lambda t: _plan_with_hardware(t, '{"name": "x"}', "profile.json"), autotp.ConfigError, r"profile\.json: not valid TOML"),
    ("profile-empty", lambda t: _plan_with_hardware(t, ""), autotp.ConfigError, r"profile\.toml: missing required field 'version'"),
    ("profile-bad-toml", lambda t: _plan_with_hardware(t, "name = \n"), autotp.ConfigError, r"profile\.toml: not valid TOML: Invalid value \(at line 1"),
    ("profile-binary", lambda t: _plan_with_hardware(t, bytes(range(256))), autotp.ConfigError, r"profile\.toml: not a text file; a hardware profile is TOML"),
    ("profile-missing", lambda t: plan_meta(hardware=str(t / "none.toml")), autotp.ConfigError, r"none\.toml: no such profile file"),
    ("profile-unknown-name", lambda t: plan_meta(hardware="tpu-v9"), autotp.ConfigError, r"unknown hardware profile 'tpu-v9'; available profiles: .*h100-sxm.*autotp calibrate"),
    # absurd budgets and limits
    ("budget-zero", lambda t: plan_meta(memory_budget=0), autotp.ConfigError, r"memory budget must be positive, got 0"),
    ("budget-negative", lambda t: plan_meta(memory_budget=-5), autotp.ConfigError, r"memory budget must be positive, got -5"),
    ("budget-abc", lambda t: plan_meta(memory_budget="abc"), autotp.ConfigError, r"cannot read memory budget 'abc': expected .*'40GiB'"),
    ("budget-10-XB", lambda t: plan_meta(memory_budget="10 XB"), autotp.ConfigError, r"cannot read memory budget '10 XB'"),
    ("budget-nan", lambda t: plan_meta(memory_budget=math.nan), autotp.ConfigError, r"cannot read memory budget nan"),
    ("budget-bool", lambda t: plan_meta(memory_budget=True), autotp.ConfigError, r"memory budget must be bytes \(int\).*got True"),
    ("budget-below-floor", lambda t: plan_meta(memory_budget=10), autotp.InfeasiblePlanError, r"no plan fits a memory budget of 10 B per device on 2 ranks.*Raise memory_budget to at least"),
    ("time-limit-nan", lambda t: plan_meta(time_limit_s=math.nan), autotp.ConfigError, r"time_limit_s must be a finite number of seconds >= 0, got nan"),
    ("time-limit-text", lambda t: plan_meta(time_limit_s="abc"), autotp.ConfigError, r"time_limit_s must be .* got 'abc'"),
    ("node-limit-zero", lambda t: plan_meta(node_limit=0), autotp.ConfigError, r"node_limit must be a whole number of branch-and-bound nodes of at least 1, got 0"),
    ("budget-nothing-divides", lambda t: plan_of(nn.Linear(7, 5), (x(2, 7),), mesh_shape=3, memory_budget=10), autotp.InfeasiblePlanError,
     r"2 of 2 tensors, the largest 'p_weight' \(5, 7\), stay whole: no dim of theirs divides by the mesh \(3,\)"),
    ("unknown-solver", lambda t: plan_meta(solver="gurobi-x"), autotp.SolverError, r"unknown solver 'gurobi-x'; use 'cbc' or 'highs'"),
    ("unknown-optimizer", lambda t: plan_meta(optimizer="adamz"), autotp.ConfigError, r"unknown optimizer 'adamz'; known: .*adamw"),
    ("mesh-zero", lambda t: plan_meta(mesh_shape=0), autotp.ConfigError, r"mesh_shape must be a non-empty sequence of positive ints.*got 0"),
    ("mesh-empty", lambda t: plan_meta(mesh_shape=()), autotp.ConfigError, r"mesh_shape must be a non-empty sequence.*got \(\)"),
    # the checkpoint functions given the original module
    ("full-state-dict-plain", lambda t: autotp.full_state_dict(nn.Linear(2, 2)), autotp.ConfigError, r"autotp\.full_state_dict expected the module autotp\.parallelize returned, got Linear"),
    ("sharded-state-dict-plain", lambda t: autotp.sharded_state_dict(nn.Linear(2, 2)), autotp.ConfigError, r"autotp\.sharded_state_dict expected the module .* got Linear; pass the sharded module"),
    ("load-sharded-plain", lambda t: autotp.load_sharded_state_dict(nn.Linear(2, 2), {}), autotp.ConfigError, r"load_sharded_state_dict expected the module .* got Linear"),
    ("save-pretrained-plain", lambda t: autotp.save_pretrained(nn.Linear(2, 2), t), autotp.ConfigError, r"save_pretrained expected the module .* got Linear"),
    ("parallelize-no-mesh", lambda t: autotp.parallelize(MLP(), "cpu", (x(),)), autotp.ConfigError, r"mesh must be a torch\.distributed\.device_mesh\.DeviceMesh, got str"),
]


@pytest.mark.parametrize(("action", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_typed_error_naming_the_cause(action: Callable[[Path], object], error: type[BaseException], message: str, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UnsupportedOpWarning and the like are not what is tested
        with pytest.raises(error, match=message) as info:
            action(tmp_path)
    assert type(info.value) is error  # the exact class, not only a base of it
    assert "\n" not in str(info.value)  # one line


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def build(:\n    pass\n", r"running .*target\.py raised SyntaxError: invalid syntax \(.*target\.py, line 1\)"),
        ("import not_a_module_for_autotp\n\ndef build():\n    pass\n", r"raised ModuleNotFoundError: No module named 'not_a_module_for_autotp' \(at .*target\.py:1\)"),
        ("def build():\n    raise ValueError('no config.json here')\n", r"calling .*target\.py:build raised ValueError: no config\.json here \(at .*target\.py:2\): fix the function"),
        ("def build(n_layer):\n    pass\n", r"calling .*:build raised TypeError: .*'n_layer'.*--config keywords"),
    ],
    ids=["syntax-error", "import-error", "builder-raises", "builder-needs-config"],
)
def test_cli_target_that_fails_is_one_line_and_exit_2(source: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "target.py"
    target.write_text(source)
    assert cli_main(["plan", f"{target}:build", "--mesh", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autotp: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_an_unimportable_module_target_is_a_target_error() -> None:
    with pytest.raises(autotp.TargetError, match=r"importing module 'not_a_module_for_autotp' raised ModuleNotFoundError"):
        load_target("not_a_module_for_autotp:build")


def test_a_zero_time_limit_warns_and_returns_the_fallback_plan() -> None:
    with pytest.warns(SolverTimeLimitWarning, match=r"0s time limit.*Raise time_limit_s"):
        plan = plan_meta(time_limit_s=0)
    reference = plan_meta()
    assert [n.name for n in plan.nodes] == [n.name for n in reference.nodes]
    assert plan.total_seconds >= reference.total_seconds  # the fallback is never better than the solver's plan


# ------------------------------------------------------------------------------------------
# multi-rank cases: one spawn of 3 ranks


RANKS = 3
CORRECT = [
    "mesh_of_one", "uneven_widths", "batchnorm_train", "tied_weights", "inplace_activations", "embedding_max_norm", "embedding_scale_grad_by_freq",
    "custom_autograd_function", "buffer_written_in_place", "mixed_inputs", "meta_init_in_parts", "dcp_directory_round_trip", "compiled",
]
SPLITS = {  # the budget forces splits there
    "batchnorm_train", "tied_weights", "inplace_activations", "embedding_max_norm", "embedding_scale_grad_by_freq", "custom_autograd_function",
    "buffer_written_in_place", "mixed_inputs", "meta_init_in_parts",
}

# case -> per rank: (error type name, regex)
ERRORS: dict[str, list[tuple[str, str]]] = {
    "plan_for_another_world": [("PlanMismatchError", r"rank 0: the plan was made for 4 ranks but the mesh has 3")] * RANKS,
    "plan_for_another_model": [("PlanMismatchError", r"the plan does not fit this model \(graph fingerprint differs\).*re-plan for this model")] * RANKS,
    "rank1_other_shape": [("PlanMismatchError", r"rank 1: parameter 'up\.weight' is float32\[192,48\], rank 0 planned float32\[96,24\]")] * RANKS,
    "rank1_bad_weights": [
        ("PeerRankError", r"rank 1 failed: CheckpointError: weights=.*no-such-checkpoint' does not exist"),
        ("CheckpointError", r"weights=.*no-such-checkpoint' does not exist: pass a safetensors file"),
        ("PeerRankError", r"rank 1 failed: CheckpointError"),
    ],
    "ranks_with_different_weights": [("PlanMismatchError", r"'[\w.]+' has different values on rank 0 and ranks 1, 2.*torch\.manual_seed.*check_replicas=False")] * RANKS,
    "dcp_directory_lacks_tensor": [("CheckpointError", r"the DCP checkpoint .*lacks_dir lacks 1 of the module's tensors: 'down\.bias'; load a checkpoint saved from this model")] * RANKS,
    "state_dict_lacks_tensor": [("CheckpointError", r"the state dict given to load_sharded_state_dict lacks 1 of the module's tensors: 'up\.weight'")] * RANKS,
    "not_a_dcp_directory": [("CheckpointError", r"is not a DCP checkpoint directory \(it has no \.metadata file\)")] * RANKS,
    "destroyed_group": [("ConfigError", r"parallelize needs torch\.distributed initialised.*destroy_process_group.*init_device_mesh")] * RANKS,
}


@pytest.fixture(scope="module")
def rank_outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, tuple[str, Any]]]:
    return run_on_ranks(_bad_inputs_fns.run_cases, RANKS, str(tmp_path_factory.mktemp("ranks")), timeout_seconds=240)


def test_every_multi_rank_case_is_asserted() -> None:
    assert sorted(CORRECT + list(ERRORS)) == sorted(_bad_inputs_fns.CASES)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CORRECT)
def test_multi_rank_unusual_input_gives_the_unsharded_result(case: str, rank_outcomes: list[dict[str, tuple[str, Any]]]) -> None:
    for rank, outcomes in enumerate(rank_outcomes):
        kind, detail = outcomes[case]
        assert kind == "ok", f"rank {rank}: {kind}: {detail}"
        assert detail["out_diff"] < 1e-5, (rank, detail)
        assert detail.get("state_diff", 0.0) < 1e-5, (rank, detail)  # weights and buffers after one step
        assert detail.get("same_keys", True), (rank, detail)
        assert detail.get("has_grads", True) and detail.get("grad_names", True), (rank, detail)
        if case in SPLITS:
            assert detail["split"] > 0, (rank, detail)  # the case really ran sharded


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(ERRORS))
def test_multi_rank_bad_input_raises_typed_on_every_rank(case: str, rank_outcomes: list[dict[str, tuple[str, Any]]]) -> None:
    for rank, (outcomes, (kind, message)) in enumerate(zip(rank_outcomes, ERRORS[case])):
        got_kind, got_message = outcomes[case]
        assert got_kind == kind, f"rank {rank}: {got_kind}: {got_message}"
        assert re.search(message, got_message), f"rank {rank}: {got_message}"
