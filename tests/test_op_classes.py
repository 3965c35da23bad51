"""Measured op-class floors: profile schema, pricing by hand, the planner's use, the fit, and
which random ops need their own generator stream."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from cost_models import OP_CLASSES, HardwareProfile, LinkProfile, OpClassRate, ProfileError, load_profile, op_seconds, profile_to_toml, roofline_seconds, write_profile
from cost_models.calibrate import KernelSample, fit_compute
from autotp.capture.export import capture
from autotp.cost.model import CostModel, node_flops, op_class
from autotp.examples import build_example
from autotp.ir.placement import Shard
from autotp.strategies.engine import NodeKind, build_strategy_space
from autotp.strategies.op_facts import draws_random
from tests._profile_fns import assert_rejected

ROUND = HardwareProfile(
    name="round-classes",
    device_type="cpu",
    peak_flops_per_s={"float32": 1e12},
    memory_bytes_per_s=1e11,
    memory_capacity_nbytes=2**30,
    compute_efficiency=0.5,  # 5e11 FLOP/s
    memory_efficiency=0.5,  # 5e10 B/s
    kernel_launch_seconds=1e-5,
    intra_node=LinkProfile(latency_seconds=1e-5, bytes_per_s=1e9),
    source="test fixture",
    op_classes={"view": OpClassRate(2e-6, 0.0), "activation": OpClassRate(3e-6, 1e-9), "attention": OpClassRate(2e-5, 1e-11)},
)


# ---------------------------------------------------------------------------------------------
# Pricing by hand


def test_an_op_costs_the_larger_of_its_roofline_and_its_class_floor() -> None:
    # GELU of 1e6 elements, 8e6 bytes: roofline 1e-5 + max(1e6 / 5e11, 8e6 / 5e10) = 1e-5 + 1.6e-4
    # = 1.7e-4 s; the activation floor 3e-6 + 1e6 * 1e-9 = 1.003e-3 s is larger.
    assert op_seconds(ROUND, flops=1e6, nbytes=8e6, op_class="activation") == pytest.approx(1.003e-3)
    # An unlisted class, or none, is priced by the roofline alone.
    assert op_seconds(ROUND, flops=1e6, nbytes=8e6, op_class="normalization") == pytest.approx(1.7e-4)
    assert op_seconds(ROUND, flops=1e6, nbytes=8e6) == roofline_seconds(ROUND, flops=1e6, nbytes=8e6)
    # Attention of 1e9 FLOPs: roofline 1e-5 + 2e-3 beats the floor 2e-5 + 1e-2? No: the floor wins.
    assert op_seconds(ROUND, flops=1e9, nbytes=1e6, op_class="attention") == pytest.approx(2e-5 + 1e9 * 1e-11)
    # A view moves nothing and costs its dispatch.
    assert op_seconds(ROUND, flops=0, nbytes=0, op_class="view") == pytest.approx(2e-6)
    assert op_seconds(dataclasses.replace(ROUND, op_classes={}), flops=0, nbytes=0, op_class="view") == 0.0


def test_ops_fall_into_the_classes_the_profile_prices() -> None:
    model, inputs = build_example("gpt", device="meta", batch=2, seq=16, n_layer=1)
    space = build_strategy_space(capture(model, inputs), 2)
    classes = {n.op: op_class(n) for n in space.nodes if n.kind is NodeKind.OP}
    assert classes["aten.linear.default"] is None  # contractions: the roofline's matmul rate
    assert classes["aten.gelu.default"] == "activation"
    assert classes["aten.layer_norm.default"] == "normalization"
    assert classes["aten.scaled_dot_product_attention.default"] == "attention"
    assert classes["aten.add.Tensor"] == "elementwise"
    assert classes["aten.view.default"] == classes["aten.transpose.int"] == "view"
    assert set(classes.values()) <= {None, *OP_CLASSES}

    replicate = {n.name: n.strategies[0] for n in space.nodes}
    no_launch = dataclasses.replace(ROUND, kernel_launch_seconds=0.0)  # GELU's roofline: 8 bytes / 5e10 per element
    for training in (False, True):
        cost = CostModel(no_launch, 2, training=training)
        view = next(n for n in space.nodes if n.op == "aten.view.default")
        factor = 3 if training and view.requires_grad else 1
        assert cost.compute_seconds(view, replicate[view.name]) == pytest.approx(factor * 2e-6)
        gelu = next(n for n in space.nodes if n.op == "aten.gelu.default")
        numel = gelu.output_meta.numel
        factor = 3 if training and gelu.requires_grad else 1
        assert cost.compute_seconds(gelu, replicate[gelu.name]) == pytest.approx(factor * (3e-6 + numel * 1e-9))
    # Without op classes, views are free as before.
    plain = CostModel(dataclasses.replace(no_launch, op_classes={}), 2)
    assert plain.compute_seconds(view, replicate[view.name]) == 0.0


@pytest.mark.parametrize("training", [False, True])
def test_cost_expression_carries_the_floors(training: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The symbolic total equals the plan's at the planned size and the planner's price elsewhere."""
    from tests.test_symbolic import assert_expression_prices_as_the_planner, plan_on_a_user_profile

    plan = plan_on_a_user_profile(ROUND, tmp_path, monkeypatch, training=training)
    floors = sum(1 for t in plan.cost_terms if getattr(t, "floor", None) is not None)
    assert floors > 10  # views, GELU, attention
    assert_expression_prices_as_the_planner(plan)


# ---------------------------------------------------------------------------------------------
# Profile files


def test_op_classes_round_trip_through_toml(tmp_path: Path) -> None:
    text = profile_to_toml(ROUND)
    assert "[compute.op_classes.activation]\nlaunch_seconds = 3e-06\nseconds_per_flop = 1e-09" in text
    path = write_profile(ROUND, tmp_path / "round.toml")
    assert load_profile(path).op_classes == ROUND.op_classes


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("[compute.op_classes.activation]", "[compute.op_classes.activations]", r"unknown field 'compute\.op_classes\.activations'.*did you mean 'activation'\?"),
        ("seconds_per_flop = 1e-09", "seconds_per_flop = -1e-09", r"field 'compute\.op_classes\.activation\.seconds_per_flop' must be a number >= 0"),
        ("seconds_per_flop = 1e-09", 'seconds_per_flop = "1 ns"', r"field 'compute\.op_classes\.activation\.seconds_per_flop' must be a number"),
        ("seconds_per_flop = 1e-09", "", r"missing required field 'compute\.op_classes\.activation\.seconds_per_flop'"),
        ("launch_seconds = 3e-06", "launch_seconds = 3", r"field 'compute\.op_classes\.activation\.launch_seconds' must be between 0 and 0\.1 seconds"),
        ("launch_seconds = 3e-06", "launch_us = 3", r"unknown field 'compute\.op_classes\.activation\.launch_us'"),
        ("version = 2", "version = 1", r"field 'compute\.op_classes' needs version = 2"),
    ],
)
def test_malformed_op_classes_name_the_file_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert_rejected(tmp_path, profile_to_toml(ROUND), old, new, message)


def test_op_class_names_are_checked_in_python_too() -> None:
    with pytest.raises(ProfileError, match=r"op_classes\.gelu' must be one of \['view', 'elementwise'"):
        dataclasses.replace(ROUND, op_classes={"gelu": OpClassRate(1e-6, 1e-9)})
    with pytest.raises(ProfileError, match=r"OpClassRate: field 'seconds_per_flop' must be a number >= 0"):
        OpClassRate(1e-6, -1.0)


# ---------------------------------------------------------------------------------------------
# The fit


def test_fit_recovers_each_class_line() -> None:
    memory = [KernelSample("memory", "float32", n / 12, float(n), 2e-6 + n / 4e10) for n in (2**12, 2**16, 2**20, 2**24)]
    matmuls = [KernelSample("matmul", "float32", 2.0 * m**3, 12.0 * m * m, 2e-6 + 2.0 * m**3 / 1e11) for m in (64, 256, 1024)]
    gelu = [KernelSample("activation", "float32", float(n), 8.0 * n, 3e-6 + n * 7e-10) for n in (4096, 65536, 2**20)]
    norm = [KernelSample("normalization", "float32", float(n), 8.0 * n, 4e-6 + n * 5e-10) for n in (4096, 65536, 2**20)]
    views = [KernelSample("view", "float32", 0.0, 0.0, t) for t in (1.9e-6, 2.0e-6, 2.4e-6)]
    fit = fit_compute(memory + matmuls + gelu + norm + views)
    assert set(fit.op_classes) == {"view", "elementwise", "activation", "normalization"}  # no attention measured
    assert fit.op_classes["activation"].launch_seconds == pytest.approx(3e-6, rel=1e-6)
    assert fit.op_classes["activation"].seconds_per_flop == pytest.approx(7e-10, rel=1e-6)
    assert fit.op_classes["normalization"].seconds_per_flop == pytest.approx(5e-10, rel=1e-6)
    assert fit.op_classes["view"] == OpClassRate(2.0e-6, 0.0)  # the median dispatch
    # elementwise reuses the memory-bound add: one element per 12 bytes, so s = 12 / 4e10 per FLOP
    assert fit.op_classes["elementwise"].seconds_per_flop == pytest.approx(12 / 4e10, rel=1e-6)
    assert fit.op_class_median_rel_error["activation"] == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Random ops


@pytest.mark.parametrize(
    ("target", "args", "kwargs", "expected"),
    [
        (torch.ops.aten.dropout.default, ("x", 0.1, True), {}, True),
        (torch.ops.aten.dropout.default, ("x", 0.1, False), {}, False),  # eval mode
        (torch.ops.aten.dropout.default, ("x", 0.0, True), {}, False),  # p = 0
        (torch.ops.aten.native_dropout.default, ("x", 0.5, True), {}, True),
        (torch.ops.aten.scaled_dot_product_attention.default, ("q", "k", "v"), {}, False),  # dropout_p defaults to 0
        (torch.ops.aten.scaled_dot_product_attention.default, ("q", "k", "v"), {"dropout_p": 0.1}, True),
        (torch.ops.aten.scaled_dot_product_attention.default, ("q", "k", "v", None, 0.1), {}, True),
        (torch.ops.aten.rand_like.default, ("x",), {}, True),
        (torch.ops.aten.gelu.default, ("x",), {}, False),
    ],
)
def test_which_calls_draw_random_numbers(target: object, args: tuple, kwargs: dict, expected: bool) -> None:
    assert draws_random(target, args, kwargs) is expected


def test_a_convolution_is_priced_as_a_contraction_and_its_split_saves_compute() -> None:
    conv = nn.Conv1d(12, 24, kernel_size=3)
    up = nn.ConvTranspose1d(24, 12, kernel_size=2, stride=2)
    model = nn.Sequential(conv, up)
    x = torch.randn(4, 12, 10)
    space = build_strategy_space(capture(model, (x,)), 2)
    by_op = {n.op: n for n in space.nodes if n.kind is NodeKind.OP}
    forward, transposed = by_op["aten.conv1d.default"], by_op["aten.conv_transpose1d.default"]
    assert op_class(forward) is None and op_class(transposed) is None
    # conv: 2 FLOPs per output element (4 x 24 x 8) and weight entry of one output channel (12 x 3)
    assert node_flops(forward) == 2 * (4 * 24 * 8) * (12 * 3)
    # transposed: per input element (4 x 24 x 8) and weight entry of one input channel (12 x 2)
    assert node_flops(transposed) == 2 * (4 * 24 * 8) * (12 * 2)
    cost = CostModel(ROUND, 2)
    whole = cost.compute_seconds(forward, forward.strategies[0])
    out_channels = next(s for s in forward.strategies if s.outputs[0] == (Shard(1),))
    assert cost.compute_seconds(forward, out_channels) < whole
