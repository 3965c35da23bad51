"""Overlap in the cost model: ``cost_models.exposed_seconds``, the profile's ``overlap_slowdown``,
a plan's hidden time, the solver's choice, and ``--no-overlap``."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cost_models import HardwareProfile, LinkProfile, ProfileError, exposed_seconds, load_profile, profile_from_dict, profile_to_toml, slowdown_from_timings
from autotp.capture.export import capture
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.io.plan_io import plan_from_dict, plan_to_dict
from autotp.solve.build import build_plan
from autotp.solve.planner import megatron_plan, solve_plan
from autotp.strategies.engine import build_strategy_space

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]


# ---------------------------------------------------------------------------------------------
# exposed_seconds


@pytest.mark.parametrize(
    ("comm", "compute", "slowdown", "exposed"),
    [
        (10.0, 4.0, 0.0, 6.0),  # C < T, no slowdown: T - C shows
        (10.0, 20.0, 0.0, 0.0),  # C >= T: all hidden
        (10.0, 20.0, 0.25, 2.0),  # C >= T/(1+s): the work lost to the slowdown, T·s/(1+s)
        (10.0, 5.0, 0.25, 5.0),  # C < T/(1+s) = 8: T - C
        (10.0, 20.0, 1e9, 10.0 * 1e9 / (1 + 1e9)),  # a huge slowdown hides (almost) nothing
        (10.0, 0.0, 0.5, 10.0),  # nothing beside it
    ],
)
def test_exposed_seconds(comm: float, compute: float, slowdown: float, exposed: float) -> None:
    assert exposed_seconds(comm, compute, slowdown=slowdown) == pytest.approx(exposed)


def test_exposed_seconds_rejects_a_negative_slowdown() -> None:
    with pytest.raises(ValueError, match="slowdown"):
        exposed_seconds(1.0, 1.0, slowdown=-0.1)


def test_slowdown_from_timings_inverts_exposed_seconds() -> None:
    comm, compute, slowdown = 3.0, 7.0, 0.3
    overlapped = compute + exposed_seconds(comm, compute, slowdown=slowdown)
    assert slowdown_from_timings(compute_seconds=compute, comm_seconds=comm, overlapped_seconds=overlapped) == pytest.approx(slowdown)
    assert slowdown_from_timings(compute_seconds=compute, comm_seconds=comm, overlapped_seconds=compute - 1.0) == 0.0  # noise below C
    assert slowdown_from_timings(compute_seconds=compute, comm_seconds=comm, overlapped_seconds=compute + 10 * comm) == pytest.approx(19.0)  # r clipped at 0.95


# ---------------------------------------------------------------------------------------------
# the profile field


def test_overlap_slowdown_round_trips_through_toml() -> None:
    import tomllib

    profile = dataclasses.replace(load_profile("h100-sxm"), overlap_slowdown=0.37)
    again = profile_from_dict(tomllib.loads(profile_to_toml(profile)), where="test")
    assert again.overlap_slowdown == 0.37 and again == profile


def test_shipped_profiles_have_a_slowdown_with_a_source() -> None:
    for name in ("h100-sxm", "h200", "a100-sxm", "a100-pcie", "l40s", "cpu-gloo"):
        profile = load_profile(name)
        assert profile.overlap_slowdown > 0 and "compute.overlap_slowdown" in profile.sources


def test_a_profile_without_the_field_reads_slowdown_zero() -> None:
    import tomllib

    text = "\n".join(line for line in profile_to_toml(load_profile("cpu-gloo")).splitlines() if not line.startswith("overlap_slowdown"))
    text = "\n".join(line for line in text.splitlines() if "compute.overlap_slowdown" not in line)
    assert profile_from_dict(tomllib.loads(text), where="test").overlap_slowdown == 0.0


@pytest.mark.parametrize("bad", [-0.5, float("inf"), "0.2", True])
def test_an_invalid_slowdown_is_a_profile_error(bad: object) -> None:
    import tomllib

    data = tomllib.loads(profile_to_toml(load_profile("cpu-gloo")))
    data["compute"]["overlap_slowdown"] = bad
    with pytest.raises(ProfileError, match="overlap_slowdown"):
        profile_from_dict(data, where="test")
    with pytest.raises(ProfileError, match="overlap_slowdown"):
        dataclasses.replace(load_profile("cpu-gloo"), overlap_slowdown=bad)


# ---------------------------------------------------------------------------------------------
# a plan's hidden time


@pytest.fixture(scope="module")
def gpt_megatron() -> tuple:
    model, (idx,) = build_example("gpt", batch=2, seq=16, device="meta")
    space = build_strategy_space(capture(model, (idx,)), 2)
    on = CostModel(resolve_hardware("h100-sxm"), 2, training=True, optimizer="adamw")
    plan, _ = megatron_plan(space, on, hardware="h100-sxm")
    assert plan is not None
    return space, {n.name: n.strategy for n in plan.nodes}


def test_a_megatron_plan_hides_its_fused_gradient_syncs(gpt_megatron: tuple) -> None:
    space, chosen = gpt_megatron
    profile = resolve_hardware("h100-sxm")
    on = build_plan(space, chosen, CostModel(profile, 2, training=True, optimizer="adamw"), hardware="h100-sxm", memory_budget=None)
    off = build_plan(space, chosen, CostModel(profile, 2, training=True, optimizer="adamw", overlap=False), hardware="h100-sxm", memory_budget=None)
    assert on.overlap and not off.overlap
    syncs = [(n, c) for n, c in on.conversions() if c.backward_only and c.priced]
    hidden = [(n.name, c) for n, c in syncs if c.hidden_seconds > 0]
    # each block's q/k/v projections (one sync on the layer norm's output) and its MLP's c_fc
    assert len(hidden) == 4 and {c.sync_kind for _, c in hidden} == {"grad_all_reduce"}
    assert all(c.hidden_seconds > 0 and c.seconds > 0 for _, c in hidden)  # slowdown 0.2: never all of it
    assert off.hidden_seconds == 0.0 and all(c.hidden_seconds == 0.0 for _, c in off.conversions())
    assert on.hidden_seconds > 0
    assert on.total_seconds == pytest.approx(off.total_seconds - on.hidden_seconds, rel=1e-12)
    assert on.comm_seconds + on.hidden_seconds == pytest.approx(off.comm_seconds, rel=1e-12)


def test_the_plan_json_keeps_overlap_and_hidden_time(gpt_megatron: tuple) -> None:
    space, chosen = gpt_megatron
    plan = build_plan(space, chosen, CostModel(resolve_hardware("h100-sxm"), 2, training=True), hardware="h100-sxm", memory_budget=None)
    again = plan_from_dict(plan_to_dict(plan))
    assert again.overlap is True and again.hidden_seconds == plan.hidden_seconds and again.total_seconds == plan.total_seconds
    old = plan_to_dict(plan)
    del old["overlap"]
    assert plan_from_dict(old).overlap is False  # a file from before overlap was priced without it


# ---------------------------------------------------------------------------------------------
# the solver: a layout that hides its communication wins


class _EmbedMLP(nn.Module):
    """emb -> fc1 -> relu -> fc2: split as Megatron's MLP, fc1 reads the embedding whole, so its
    gradient needs an all-reduce, which fc1's weight gradient can hide."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(64, 256), nn.Linear(256, 1024), nn.Linear(1024, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(idx))))


# Communication about as dear as compute: at 1.2e8 B/s the split MLP costs 15.5 ms with its
# gradient sync hidden and 16.9 ms without, against 16.2 ms for the replicated one.
_TOY = HardwareProfile(
    name="toy", device_type="cpu", peak_flops_per_s={"float32": 1e11}, memory_bytes_per_s=1e11, memory_capacity_nbytes=2**34,
    compute_efficiency=1.0, memory_efficiency=1.0, kernel_launch_seconds=0.0,
    intra_node=LinkProfile(latency_seconds=0.0, bytes_per_s=1.2e8), source="test: comm ~ compute", overlap_slowdown=0.0,
)


def test_the_solver_splits_when_overlap_hides_the_gradient_sync() -> None:
    model = _EmbedMLP().to("meta")
    space = build_strategy_space(capture(model, (torch.zeros(8, 64, dtype=torch.int64, device="meta"),)), 2)
    plans = {
        overlap: solve_plan(space, CostModel(_TOY, 2, training=True, overlap=overlap), hardware="toy", memory_budget=None)
        for overlap in (True, False)
    }
    fc1 = {overlap: next(n for n in p.nodes if n.module_path == "fc1" and n.op == "aten.linear.default") for overlap, p in plans.items()}
    assert str(fc1[True].strategy) == "[R, S(0), S(0)] -> S(2)"  # column parallel
    assert fc1[False].strategy.replicated
    assert plans[True].hidden_seconds > 0
    assert plans[True].total_seconds < plans[False].total_seconds
    # without overlap the split layout is dearer than the replicated one the solver kept
    split = build_plan(space, {n.name: n.strategy for n in plans[True].nodes}, CostModel(_TOY, 2, training=True, overlap=False), hardware="toy", memory_budget=None)
    assert split.total_seconds > plans[False].total_seconds


def test_the_ilp_credit_is_at_most_the_hideable_share() -> None:
    model = _EmbedMLP().to("meta")
    space = build_strategy_space(capture(model, (torch.zeros(8, 64, dtype=torch.int64, device="meta"),)), 2)
    node = next(n for n in space.nodes if n.module_path == "fc1" and n.op == "aten.linear.default")
    strategy = next(s for s in node.strategies if str(s) == "[R, S(0), S(0)] -> S(2)")
    cost = CostModel(dataclasses.replace(_TOY, overlap_slowdown=1.0), 2, training=True)
    wgrad = cost.forward_kernel_seconds(node, strategy)
    assert wgrad == pytest.approx(cost.kernel_seconds(node, strategy) / 3) and wgrad > 0  # one forward's worth of a 1 + 2 training price
    assert cost.weight_grad_credit_seconds(node, strategy, wgrad, 2) == pytest.approx(wgrad / 4)  # T / ((1 + 1) · 2)
    assert cost.weight_grad_credit_seconds(node, strategy, 100 * wgrad, 1) == pytest.approx(wgrad)  # no more than the compute
    assert dataclasses.replace(cost, overlap=False).weight_grad_credit_seconds(node, strategy, wgrad, 1) == 0.0


# ---------------------------------------------------------------------------------------------
# calibration


def test_fit_overlap_is_the_median_slowdown() -> None:
    from cost_models.calibrate import OverlapSample, fit_overlap

    samples = [OverlapSample(4.0, 2.0, 4.0 + 2.0 * r) for r in (0.1, 0.2, 0.5)]  # r = s/(1+s)
    assert fit_overlap(samples) == pytest.approx(0.2 / 0.8)
    noisy = [OverlapSample(4.0, 2.0, 4.4), OverlapSample(4.0, 20.0, 4.4), OverlapSample(4.0, 2.0, 4.4)]  # one slow all-reduce
    assert fit_overlap(noisy) == pytest.approx(0.2 / 0.8)  # medians of C, T and O: r = (4.4 - 4) / 2
    assert fit_overlap([]) is None


@pytest.mark.timeout(180)
def test_calibration_on_two_ranks_writes_a_finite_slowdown(tmp_path) -> None:
    import math

    from cost_models import roofline_seconds, write_profile
    from cost_models.calibrate import CollectiveSample, KernelSample, build_profile, fit_all
    from autotp.cost.calibrate import CalibrationConfig, merge_overlap
    from autotp.testing import run_on_ranks
    from tests import _overlap_cost_fns

    config = CalibrationConfig(
        device_type="cpu", matmul_shapes=(), dtypes=(), memory_nbytes=(), message_nbytes=(), overlap_nbytes=256 * 2**10, overlap_repeats=3,
    )
    samples = merge_overlap(run_on_ranks(_overlap_cost_fns.measure, 2, config, timeout_seconds=120))
    assert len(samples) == 3 and all(s.compute_seconds > 0 and s.comm_seconds > 0 and s.overlapped_seconds > 0 for s in samples)
    # the rest of the profile from synthetic timings (tests/test_calibrate.py measures those)
    kernels = [KernelSample("memory", "float32", n / 12, float(n), roofline_seconds(_TOY, flops=n / 12, nbytes=n)) for n in (2**12, 2**16, 2**20, 2**24)]
    kernels += [KernelSample("matmul", "float32", 2.0 * m**3, 12.0 * m * m, roofline_seconds(_TOY, flops=2.0 * m**3, nbytes=12.0 * m * m)) for m in (64, 256, 1024)]
    collectives = [CollectiveSample("all_reduce", 2, float(b), 1e-4 + b / 1e9) for b in (2**12, 2**16, 2**20, 2**24)]
    report = fit_all(kernels, collectives, overlap=samples)
    profile = build_profile(report, name="box", device_type="cpu", memory_capacity_nbytes=2**33, description="test")
    again = load_profile(write_profile(profile, tmp_path / "box.toml", header=report.text()))
    assert math.isfinite(again.overlap_slowdown) and 0.0 <= again.overlap_slowdown <= 19.0
    assert again.overlap_slowdown == report.overlap_slowdown and "compute.overlap_slowdown" in again.sources
    assert "overlap: compute runs at" in report.text()


class _TwoBranches(nn.Module):
    """fc1 and fc2 read x apart; fc1's output, split, is gathered while fc2 and the relu run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(256, 256), nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(x) + torch.relu(self.fc2(x))


def test_a_forward_collective_hides_behind_the_nodes_it_runs_beside() -> None:
    space = build_strategy_space(capture(_TwoBranches().to("meta"), (torch.zeros(8, 64, 256, device="meta"),)), 2)
    nodes = space.by_name()
    pins = {name: nodes[name].strategies[0] for name in ("linear_1", "relu", "add")}  # all-R
    pins["linear"] = next(s for s in nodes["linear"].strategies if str(s) == "[R, S(0), S(0)] -> S(2)")
    plans = {
        overlap: solve_plan(space, CostModel(_TOY, 2, training=False, overlap=overlap), hardware="toy", memory_budget=None, pinned=pins)
        for overlap in (True, False)
    }
    gather = {overlap: next(c for n, c in p.conversions() if n.name == "add" and c.kind == "all_gather") for overlap, p in plans.items()}
    beside = plans[True].node("linear_1").compute_seconds + plans[True].node("relu").compute_seconds
    assert 0 < beside < gather[False].seconds  # less compute than communication: all of it hides
    assert gather[True].hidden_seconds == pytest.approx(beside)
    assert gather[True].seconds == pytest.approx(gather[False].seconds - beside)


def test_no_overlap_on_the_cli_prices_every_collective_in_full(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """``autotp plan --no-overlap`` writes a plan priced without overlap; by default the same
    layout hides part of its gradient syncs, and the saved plan says which it was."""
    import json

    from autotp.cli import main

    args = ["plan", "gpt", "--mesh", "4", "--hardware", "h100-sxm", "--input", "idx:int64[8,512]", "--config", "n_embd=1024",
            "--config", "n_head=16", "--config", "block_size=512", "--no-baselines", "--quiet", "--format", "json"]
    saved = {}
    for flag in ("", "--no-overlap"):
        out = tmp_path / f"plan{flag}.json"
        assert main([*args, *([flag] if flag else []), "--out", str(out)]) == 0, capsys.readouterr().err
        saved[flag] = plan_from_dict(json.loads(out.read_text()))
    on, off = saved[""], saved["--no-overlap"]
    assert on.overlap and not off.overlap
    assert on.hidden_seconds > 0 and off.hidden_seconds == 0.0
    assert on.total_seconds < off.total_seconds
