"""Bad input gets a typed error that names what is wrong and what to do."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import autotp
from autotp.api import plan_model
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.ir.placement import Shard
from autotp.ir.strategy import OpStrategy
from autotp.solve.ilp import solve


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.sum() > 0:  # data-dependent Python control flow: export cannot trace it
            return y
        return -y


class UsesRenorm(nn.Module):
    """An op no rule covers (renorm rescales each slice along a dim by that slice's norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.renorm(self.proj(x).view(-1, 4, 4), 2, 0, 1.0)


def _line_of(code: str) -> int:
    """The line number of this file's first line containing ``code``."""
    return next(k for k, line in enumerate(open(__file__).read().splitlines(), 1) if code in line and "_line_of" not in line)


def test_a_pin_the_node_cannot_take_names_the_users_source_line() -> None:
    model, inputs = build_example("mlp", device="meta")
    result = plan_model(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget=None)
    linear = next(n for n in result.space.nodes if n.op == "aten.linear.default")
    with pytest.raises(autotp.SolverError) as info:
        solve(result.space, CostModel(resolve_hardware("cpu-gloo"), 2), pinned={linear.name: OpStrategy((Shard(5),), Shard(5))})
    message = str(info.value)
    assert f"node '{linear.name}' (aten.linear.default) in module 'layers.0.fc1' at " in message
    assert "autotp/examples/mlp.py:" in message and "self.fc1(x)" in message, message


def test_public_errors_share_one_base() -> None:
    for error in (autotp.CaptureError, autotp.InfeasiblePlanError, autotp.ConfigError, autotp.PlanMismatchError, autotp.SolverError):
        assert issubclass(error, autotp.AutoTPError)


def test_capture_error_names_the_model_and_the_reason() -> None:
    with pytest.raises(autotp.CaptureError, match=r"could not capture model 'DataDependent'.*data-dependent|could not capture model 'DataDependent'.*(Guard|guard|symbolic)") as info:
        autotp.plan(DataDependent(), (torch.randn(2, 8),), mesh_shape=(2,))
    assert "test_errors.py" in str(info.value)  # points at the user's source line
    assert info.value.__cause__ is not None


def test_example_inputs_must_be_a_tuple() -> None:
    with pytest.raises(autotp.CaptureError, match=r"example_inputs must be a tuple.*\(x,\)"):
        autotp.plan(nn.Linear(4, 4), torch.randn(2, 4), mesh_shape=(2,))  # type: ignore[arg-type]


def test_infeasible_budget_states_the_smallest_budget_that_fits() -> None:
    model, inputs = build_example("mlp", device="meta")
    with pytest.raises(autotp.InfeasiblePlanError, match=r"at least .* \((\d+) bytes\) per device") as info:
        autotp.plan(model, inputs, mesh_shape=(4,), memory_budget=1000)
    assert "gradients and adamw optimizer state" in str(info.value)
    smallest = int(str(info.value).split("(")[1].split(" bytes")[0])
    plan = autotp.plan(model, inputs, mesh_shape=(4,), memory_budget=smallest)
    assert plan.memory_nbytes_per_device <= smallest


@pytest.mark.parametrize("budget", ["forty gigs", "-3GiB", 0, "12XB", True])
def test_bad_memory_budget(budget: object) -> None:
    model, inputs = build_example("mlp", device="meta")
    with pytest.raises(autotp.ConfigError, match="memory budget"):
        autotp.plan(model, inputs, mesh_shape=(2,), memory_budget=budget)  # type: ignore[arg-type]


def test_memory_budget_strings() -> None:
    from autotp.ir.units import parse_nbytes

    assert parse_nbytes("40GiB") == 40 * 2**30
    assert parse_nbytes("512 MiB") == 512 * 2**20
    assert parse_nbytes("80GB") == 80 * 10**9
    assert parse_nbytes(1234) == 1234


@pytest.mark.parametrize("mesh_shape", [(2, 0), (0,), ()])
def test_bad_mesh_shape(mesh_shape: tuple[int, ...]) -> None:
    model, inputs = build_example("mlp", device="meta")
    with pytest.raises(autotp.ConfigError, match="mesh_shape"):
        autotp.plan(model, inputs, mesh_shape=mesh_shape)


def test_unknown_hardware_lists_the_known_profiles() -> None:
    model, inputs = build_example("mlp", device="meta")
    with pytest.raises(autotp.ConfigError, match=r"h100-sxm"):
        autotp.plan(model, inputs, mesh_shape=(2,), hardware="tpu-v9")


def test_unsupported_op_falls_back_to_replication_with_one_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = autotp.plan(UsesRenorm(), (torch.randn(4, 16),), mesh_shape=(2,), memory_budget=700, training=False)
    ours = [w for w in caught if issubclass(w.category, autotp.UnsupportedOpWarning)]
    assert len(ours) == 1 and "aten.renorm" in str(ours[0].message)
    assert f"{__file__}:{_line_of('torch.renorm(')}: return torch.renorm(" in str(ours[0].message)  # the user's line
    unsupported = next(n for n in plan.nodes if "renorm" in n.op)
    assert str(unsupported.strategy) == "[R] -> R"
    assert plan.sharded_state()  # the linear before it is still split to meet the budget
