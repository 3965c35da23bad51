"""The sharded module takes what the original takes, or says no: keyword arguments bind as the
original ``forward`` binds them, a Python scalar other than the planned one, another dtype or an
undeclared size is an ``InputMismatchError`` naming the input, and dims declared dynamic run at
other sizes with the same plan (outputs and gradients equal to the original's)."""
from __future__ import annotations

import pytest
import torch

from autotp.errors import ConfigError, InputMismatchError
from autotp.runtime.arguments import PlannedCall
from autotp.testing import run_on_ranks
from tests._call_fns import TwoInputs, gpt_other_sizes, sharded_calls

pytestmark = pytest.mark.timeout(400)
TOL = 1e-5


@pytest.fixture(scope="module")
def calls() -> dict:
    return run_on_ranks(sharded_calls, 2, timeout_seconds=300)[0]


@pytest.fixture(scope="module")
def gpt() -> dict:
    return run_on_ranks(gpt_other_sizes, 2, timeout_seconds=300)[0]


def test_scalar_argument_with_its_planned_value_runs_and_another_value_is_refused(calls: dict) -> None:
    assert calls["scalar_collectives"] > 0
    assert calls["scalar_same_error"] < TOL and calls["scalar_keyword_error"] < TOL
    assert calls["scalar_other"].startswith("InputMismatchError")
    assert "'n'" in calls["scalar_other"] and "3" in calls["scalar_other"] and "5" in calls["scalar_other"]


def test_keyword_arguments_bind_as_the_original_forward_binds_them(calls: dict) -> None:
    assert calls["two_split_params"] > 0
    assert calls["keyword_swapped_error"] < TOL
    assert calls["keyword_mixed_error"] < TOL
    assert calls["keyword_default_error"] < TOL


def test_arguments_the_plan_cannot_take_are_refused_by_name(calls: dict) -> None:
    assert calls["keyword_unplanned"].startswith("InputMismatchError") and "'mask'" in calls["keyword_unplanned"]
    assert calls["keyword_missing"].startswith("InputMismatchError") and "'b'" in calls["keyword_missing"]
    assert calls["dtype_other"].startswith("InputMismatchError") and "float64" in calls["dtype_other"]
    assert calls["batch_other"].startswith("InputMismatchError")
    assert "(4, 16)" in calls["batch_other"] and "(3, 16)" in calls["batch_other"] and "dynamic_dims" in calls["batch_other"]


def test_a_size_that_changes_the_graph_is_refused_naming_the_control_flow(calls: dict) -> None:
    assert calls["branch_same_side_error"] < 1e-5  # a new size on the planned side of the branch re-captures and runs
    outcome = calls["branch_other_side"]
    assert outcome.startswith("InputMismatchError") and "control flow depends on the sizes" in outcome, outcome
    assert "'mul'" in outcome or "ops where the planned graph has" in outcome, outcome


def test_attention_at_another_batch_size_is_refused_without_dynamic_dims(gpt: dict) -> None:
    assert gpt["fixed_other_batch"].startswith("InputMismatchError")
    assert "'idx'" in gpt["fixed_other_batch"] and "(2, 8)" in gpt["fixed_other_batch"] and "(4, 8)" in gpt["fixed_other_batch"]
    assert gpt["fixed_targets"].startswith("InputMismatchError") and "'targets'" in gpt["fixed_targets"]


def test_dynamic_dims_run_other_sizes_with_equal_outputs_and_gradients(gpt: dict) -> None:
    assert gpt["split_params"] > 0 and gpt["dynamic_collectives"] > 0
    for name, errors in gpt["dynamic"].items():
        assert errors["output"] < TOL, name
        assert errors["grad"] < TOL, name
    assert gpt["dynamic"]["batch 3 seq 5"]["shape"] == (3, 5, 256)
    assert gpt["graphs_built"] == 1  # the second call at (3, 5) reused the graph
    assert gpt["dynamic_rank_changed"].startswith("InputMismatchError") and "planned rank" in gpt["dynamic_rank_changed"]


# Offline: binding rules without processes.

def _planned(**dynamic_dims: tuple[int, ...]) -> PlannedCall:
    a, b = torch.zeros(4, 16), torch.zeros(4, 16)
    return PlannedCall.from_example(TwoInputs().forward, (a, b), model_name="TwoInputs", dynamic_dims=dynamic_dims)


def test_binding_puts_keyword_arguments_in_forward_order() -> None:
    a, b = torch.ones(4, 16), torch.full((4, 16), 2.0)
    leaves, resized = _planned().bind((), {"b": b, "a": a})
    assert leaves[0] is a and leaves[1] is b and resized is None


def test_dynamic_dims_report_the_new_shapes_and_keep_the_others_fixed() -> None:
    planned = _planned(a=(0,), b=(-2,))
    assert planned.bind((torch.zeros(3, 16), torch.zeros(3, 16)), {})[1] == ((3, 16), (3, 16))
    with pytest.raises(InputMismatchError, match=r"input 'a' of TwoInputs was planned with shape \(4, 16\), given \(4, 8\)"):
        planned.bind((torch.zeros(4, 8), torch.zeros(4, 16)), {})


@pytest.mark.parametrize(
    ("dynamic_dims", "message"),
    [
        ({"x": (0,)}, r"'x', which is not a tensor input of TwoInputs; its tensor inputs are: a, b"),
        ({"a": (2,)}, r"dynamic_dims\['a'\] names dim 2, but 'a' has 2 dims"),
        ({"a": ("0",)}, r"must be tensor dims \(ints\)"),
    ],
)
def test_bad_dynamic_dims_are_config_errors(dynamic_dims: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _planned(**dynamic_dims)
