"""A collective's wake-up after long compute, priced from where it falls in the plan's schedule.

On gloo a collective costs more the longer its ranks computed since the one before it, up to a
plateau. Calibration times each collective after 1, 2, 4 and 8 times its usual gap
(``cost_models.WakeCurve``), and a plan adds to each collective the curve at the compute run
since the previous collective (``autotp.cost.wake``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cost_models import CollectiveLink, HardwareProfile, LinkProfile, ProfileError, WakeCurve, load_profile, wake_seconds, write_profile
from cost_models.calibrate import CalibrationError, CollectiveSample, KernelSample, WakeSample, build_profile, fit_all, fit_wake
from autotp.api import plan_model
from autotp.comm.redistribute import StepKind
from autotp.cost.model import BACKWARD_COMPUTE_FACTOR, CostModel, resolve_hardware
from autotp.cost.symbolic import B, T, attach_cost_terms
from autotp.cost.wake import collective_gaps
from autotp.examples import build_example
from autotp.ir.plan import Plan
from autotp.solve.build import build_plan
from autotp.solve.ilp import solve
from autotp.solve.layouts import megatron_pins
from tests._profile_fns import assert_rejected, cpu_link_toml

KIB = 2**10
CURVE = WakeCurve((1e-3, 3e-3, 9e-3), (0.0, 1.2e-3, 1.5e-3))
SMALL = WakeCurve((2e-5, 1e-4, 4e-4), (0.0, 1e-4, 1.5e-4))  # at the gaps of a tiny GPT priced by cpu-gloo


# ------------------------------------------------------------------------------------------
# The curve


@pytest.mark.parametrize(("gap", "extra"), [(0.0, 0.0), (1e-3, 0.0), (2e-3, 0.6e-3), (3e-3, 1.2e-3), (5e-3, 1.3e-3), (9e-3, 1.5e-3), (1.0, 1.5e-3)])
def test_wake_curve_by_hand(gap: float, extra: float) -> None:
    """0 up to the reference gap, linear between measured gaps, flat past the last."""
    assert CURVE.seconds(gap) == pytest.approx(extra, abs=1e-15)


@pytest.mark.parametrize(
    ("gaps", "extras", "message"),
    [
        ((1e-3,), (0.0,), "same number of points, at least 2"),
        ((1e-3, 2e-3), (0.0,), "same number of points"),
        ((2e-3, 1e-3), (0.0, 1e-3), "strictly increasing"),
        ((1e-3, 2e-3), (1e-4, 2e-4), "0 at the reference gap"),
        ((1e-3, 2e-3, 3e-3), (0.0, 2e-4, 1e-4), "never decreasing"),
        ((1e-3, 2e-3), (0.0, -1e-4), "extra_seconds"),
        ("fast", (0.0, 1e-4), "gaps_seconds.*a sequence of seconds"),
    ],
)
def test_invalid_wake_curves_are_refused(gaps, extras, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        WakeCurve(gaps, extras)


def test_a_collectives_own_curve_replaces_the_links() -> None:
    own = WakeCurve((1e-3, 2e-3), (0.0, 5e-4))
    link = LinkProfile(latency_seconds=0.0, bytes_per_s=1e9, wake=CURVE, collectives={"all_gather": CollectiveLink(bytes_per_s=2e9, wake=own)})
    assert wake_seconds(link, "all_gather", gap_seconds=5e-3, group_size=2) == 5e-4
    assert wake_seconds(link, "all_reduce", gap_seconds=5e-3, group_size=2) == pytest.approx(1.3e-3)
    assert wake_seconds(link, "all_reduce", gap_seconds=5e-3, group_size=1) == 0.0  # no peers, no collective
    assert wake_seconds(dataclasses.replace(link, wake=None), "all_reduce", gap_seconds=5e-3, group_size=2) == 0.0
    grouped = dataclasses.replace(link, measured_groups={4: LinkProfile(latency_seconds=0.0, bytes_per_s=1e9)})
    assert wake_seconds(grouped, "all_reduce", gap_seconds=5e-3, group_size=4) == 0.0  # the group's link has none


# ------------------------------------------------------------------------------------------
# Profile files


WAKE_TOML = cpu_link_toml("wake-file") + """
[links.intra_node.all_gather]
bytes_per_s = 1e9

[links.intra_node.all_gather.wake]
gaps_seconds = [1e-3, 4e-3]
extra_seconds = [0.0, 2e-3]

[links.intra_node.wake]
gaps_seconds = [1e-3, 3e-3, 9e-3]
extra_seconds = [0.0, 1.2e-3, 1.5e-3]

[sources]
"links.intra_node.wake" = "measured"
"links.intra_node.all_gather.wake.gaps_seconds" = "measured"
"""


def test_wake_curves_load_from_toml_and_write_back_equal(tmp_path: Path) -> None:
    path = tmp_path / "wake.toml"
    path.write_text(WAKE_TOML, encoding="utf-8")
    profile = load_profile(path)
    link = profile.intra_node
    assert link.wake == CURVE
    assert link.wake_curve("all_gather") == WakeCurve((1e-3, 4e-3), (0.0, 2e-3))
    assert link.wake_curve("broadcast") == CURVE
    grouped = dataclasses.replace(profile, intra_node=dataclasses.replace(link, measured_groups={4: dataclasses.replace(link, wake=None)}))
    assert load_profile(write_profile(grouped, tmp_path / "again.toml")) == grouped


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("extra_seconds = [0.0, 1.2e-3, 1.5e-3]", "extra_seconds = [0.0, 1.2e-3]", r"field 'links\.intra_node\.wake': .*same number of points"),
        ("extra_seconds = [0.0, 1.2e-3, 1.5e-3]", "", r"missing required field 'links\.intra_node\.wake\.extra_seconds'"),
        ("extra_seconds = [0.0, 1.2e-3, 1.5e-3]", "extra_seconds = [0.0, 1.2e-3, 1.5]", r"field 'links\.intra_node\.wake\.extra_seconds\[2\]' must be between 0 and 0\.1 seconds"),
        ("gaps_seconds = [1e-3, 3e-3, 9e-3]", "gaps_seconds = [1e-3, 3e-3, -9e-3]", r"field 'links\.intra_node\.wake\.gaps_seconds\[2\]' must be"),
        ("gaps_seconds = [1e-3, 3e-3, 9e-3]", "gaps_seconds = [3e-3, 1e-3, 9e-3]", r"field 'links\.intra_node\.wake': .*strictly increasing"),
        ("gaps_seconds = [1e-3, 3e-3, 9e-3]", 'gaps_seconds = "1ms"', r"field 'links\.intra_node\.wake\.gaps_seconds' must be an array of seconds"),
        ("gaps_seconds = [1e-3, 4e-3]", "gap_seconds = [1e-3, 4e-3]", r"unknown field 'links\.intra_node\.all_gather\.wake\.gap_seconds'"),
        ('"links.intra_node.wake" =', '"links.intra_node.wakeup" =', r"field 'sources' names 'links\.intra_node\.wakeup'"),
        ("version = 2", "version = 1", r"needs version = 2"),
    ],
)
def test_malformed_wake_curves_name_file_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = WAKE_TOML if old != "version = 2" else WAKE_TOML.split("[sources]")[0].replace("[links.intra_node.all_gather]\nbytes_per_s = 1e9\n", "").replace(
        "[links.intra_node.all_gather.wake]\ngaps_seconds = [1e-3, 4e-3]\nextra_seconds = [0.0, 2e-3]\n", "")
    assert_rejected(tmp_path, text, old, new, message)


# ------------------------------------------------------------------------------------------
# Fitting


def _wake_samples(kind: str, times: list[float], gaps=(1e-3, 2e-3, 4e-3, 8e-3)) -> list[WakeSample]:
    return [WakeSample(kind, 2, 128.0 * KIB, g, t) for g, t in zip(gaps, times)]


def test_fit_wake_is_the_closest_non_decreasing_curve() -> None:
    # 2.2, 3.5, 3.2, 2.9 ms: the last three pool to their mean, 3.2 ms, 1 ms over the first
    curve = fit_wake(_wake_samples("all_reduce", [2.2e-3, 3.5e-3, 3.2e-3, 2.9e-3]))
    assert curve.gaps_seconds == (1e-3, 2e-3, 4e-3, 8e-3)
    assert curve.extra_seconds == pytest.approx((0.0, 1e-3, 1e-3, 1e-3))
    # a first time above the next pools with it: the reference is their mean, and the curve starts flat
    curve = fit_wake(_wake_samples("all_gather", [1.4e-3, 1.0e-3, 1.9e-3, 2.0e-3]))
    assert curve.extra_seconds == pytest.approx((0.0, 0.0, 0.7e-3, 0.8e-3))
    # faster after longer gaps (noise): no wake-up at all
    assert fit_wake(_wake_samples("broadcast", [2e-3, 1.9e-3, 1.8e-3, 1.7e-3])).extra_seconds == (0.0, 0.0, 0.0, 0.0)
    assert fit_wake(_wake_samples("all_reduce", [1e-3])) is None
    with pytest.raises(CalibrationError, match="gaps before it must differ"):
        fit_wake(_wake_samples("all_reduce", [1e-3, 2e-3], gaps=(1e-3, 1e-3)))


def test_calibration_writes_each_collectives_curve(tmp_path: Path) -> None:
    sizes = [4 * KIB * 4**k for k in range(6)]
    kernels = [KernelSample("memory", "float32", n / 12, float(n), 1e-5 + n / 1e10) for n in sizes]
    kernels += [KernelSample("matmul", "float32", 2.0 * m**3, 12.0 * m * m, 1e-5 + 2.0 * m**3 / 1e11) for m in (64, 256, 1024)]
    collectives = [CollectiveSample(kind, 2, float(b), 1e-4 + b / 1e9) for kind in ("all_reduce", "all_gather") for b in sizes]
    wake = _wake_samples("all_reduce", [1e-3, 1.5e-3, 2e-3, 2e-3]) + _wake_samples("all_gather", [1e-3, 1e-3, 1.2e-3, 1.3e-3])
    report = fit_all(kernels, collectives, wake)
    profile = build_profile(report, name="w", device_type="cpu", memory_capacity_nbytes=2**33, description="test")
    assert profile.name == "w"
    link = profile.intra_node
    assert link.wake.extra_seconds == pytest.approx((0.0, 0.5e-3, 1e-3, 1e-3))
    assert link.wake_curve("all_gather").extra_seconds == pytest.approx((0.0, 0.0, 0.2e-3, 0.3e-3))
    assert "wake-up: each collective of 128KiB on 2 ranks" in report.text()
    assert "all_reduce of 131072 bytes on 2 ranks" in profile.sources["links.intra_node.wake"]
    assert "all_gather of 131072 bytes" in profile.sources["links.intra_node.all_gather.wake"]
    assert load_profile(write_profile(profile, tmp_path / "w.toml")) == profile


@pytest.mark.timeout(240)
def test_calibration_times_each_collective_after_longer_gaps() -> None:
    from autotp.cost.calibrate import CalibrationConfig, measure_rank, merge
    from autotp.testing import run_on_ranks

    config = CalibrationConfig(
        device_type="cpu", matmul_shapes=((32, 32, 32),), dtypes=("float32",), memory_nbytes=(16 * KIB,), message_nbytes=(16 * KIB,),
        collectives=("all_reduce", "all_gather"), repeats=3, warmup=0, batch_seconds=0.005, wake_gaps=(1, 3),
    )
    assert config.n_samples(2) == 2 + 2 * 1 * 1 + 2 * 2 + len(("view", "t", "unsqueeze"))
    _, _, wake = merge(run_on_ranks(measure_rank, 2, config, timeout_seconds=180))
    assert [(s.collective, s.group_size) for s in wake] == [("all_reduce", 2), ("all_reduce", 2), ("all_gather", 2), ("all_gather", 2)]
    for short, long in (wake[:2], wake[2:]):
        assert 0 < short.gap_seconds and 2 * short.gap_seconds < long.gap_seconds  # three gap kernels take about 3 times one
        assert short.seconds > 0 and long.seconds > 0


# ------------------------------------------------------------------------------------------
# Plans


def _with_wake(curve: WakeCurve, name: str = "cpu-gloo") -> HardwareProfile:
    profile = resolve_hardware(name)
    return dataclasses.replace(profile, name=f"{name}-wake", intra_node=dataclasses.replace(profile.intra_node, wake=curve))


def _megatron(profile: HardwareProfile, *, training: bool, batch: int = 4, seq: int = 16) -> Plan:
    model, inputs = build_example("gpt", device="meta", batch=batch, seq=seq)
    result = plan_model(model, inputs, mesh_shape=(2,), hardware=profile, memory_budget=None, training=training)
    cost = CostModel(profile, 2, training=training, optimizer=result.plan.optimizer)
    pins = megatron_pins(result.space)
    return build_plan(result.space, solve(result.space, cost, pinned=pins).chosen(result.space), cost, hardware=profile.name, memory_budget=None)


@pytest.mark.parametrize("training", [False, True])
def test_the_gaps_split_the_steps_compute_between_the_collectives(training: bool) -> None:
    """With a curve that is the gap itself, the wake-ups add up to the step's compute: every op's
    forward and backward falls into exactly one gap."""
    identity = WakeCurve((0.0, 1.0), (0.0, 1.0))
    plan = _megatron(_with_wake(identity), training=training)
    plain = _megatron(resolve_hardware("cpu-gloo"), training=training)
    assert plain.wake_seconds == 0.0 and len(plan.collectives(backward=True)) >= 4
    assert plan.wake_seconds == pytest.approx(plan.compute_seconds, rel=1e-12)
    assert plan.total_seconds == pytest.approx(plain.total_seconds + plan.compute_seconds, rel=1e-12)
    if training:  # the gradient all-reduces of split inputs run in backward only, and pay too
        assert any(c.backward_only and c.wake_seconds > 0 for _, c in plan.conversions())


def test_each_collective_pays_for_the_compute_since_the_one_before() -> None:
    plan = _megatron(_with_wake(SMALL), training=False)
    carriers = [k for k, n in enumerate(plan.nodes) if any(c.is_collective and c.in_forward for c in n.conversions)]
    assert len(carriers) == 4  # attention and MLP of two blocks, one all-reduce each
    compute = [n.compute_seconds for n in plan.nodes]
    # a collective runs before its node's compute; steps repeat, so the first follows the last block's tail
    gaps = [sum(compute[carriers[-1]:]) + sum(compute[:carriers[0]])] + [sum(compute[a:b]) for a, b in zip(carriers, carriers[1:])]
    for k, gap in zip(carriers, gaps):
        (conversion,) = [c for c in plan.nodes[k].conversions if c.is_collective and c.in_forward]
        assert conversion.wake_seconds == pytest.approx(SMALL.seconds(gap), rel=1e-12)
    assert sum(gaps) == pytest.approx(plan.compute_seconds)
    assert len({round(g, 12) for g in gaps}) > 1 and 0 < plan.wake_seconds  # the gaps differ, and they pay


def test_training_splits_each_ops_compute_between_forward_and_backward() -> None:
    plan = _megatron(_with_wake(SMALL), training=True)
    model, inputs = build_example("gpt", device="meta", batch=4, seq=16)
    result = plan_model(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget=None, training=True)
    grads = {n.name: n.requires_grad for n in result.space.nodes}
    gaps = collective_gaps(plan.nodes, result.space, training=True)
    kinds = [g.step.kind for g in gaps]
    # forward: the four P -> R all-reduces; backward: the gradient all-reduces of the R inputs to the column splits
    assert kinds[:4] == [StepKind.ALL_REDUCE] * 4 and len(kinds) > 4
    shares = {}
    for gap in gaps:
        for name, fraction in gap.compute:
            shares.setdefault(name, []).append(fraction)
    forward = 1 / (1 + BACKWARD_COMPUTE_FACTOR)
    for name, fractions in shares.items():  # an op that gets a gradient runs 1/3 in forward, 2/3 in backward
        assert sorted(fractions) == pytest.approx(sorted((forward, 1 - forward)) if grads[name] else [1.0])


def test_a_plan_keeps_its_wake_up_through_json(tmp_path: Path) -> None:
    plan = _megatron(_with_wake(SMALL), training=False)
    assert plan.wake_seconds > 0 and "wake-up after long compute" in plan.summary()
    assert "wake-up" not in _megatron(resolve_hardware("cpu-gloo"), training=False).summary()
    plan.save(str(tmp_path / "plan.json"))
    assert Plan.load(str(tmp_path / "plan.json")) == plan


@pytest.mark.parametrize("training", [False, True])
def test_cost_expression_prices_the_wake_up_at_every_size(training: bool) -> None:
    profile = _with_wake(SMALL)
    plan = _megatron(profile, training=training)
    model, inputs = build_example("gpt", device="meta", batch=4, seq=16)
    terms = attach_cost_terms(plan, model, inputs, hardware=profile)
    expr = terms.cost_expression()
    # the expression charges collectives in full: overlap's hidden time is not symbolic
    assert float(expr.subs({B: 4, T: 16})) == pytest.approx(plan.total_seconds + plan.hidden_seconds, rel=1e-9)
    bigger = _megatron(profile, training=training, batch=16, seq=32)
    assert 0 < plan.wake_seconds < bigger.wake_seconds
    assert float(expr.subs({B: 16, T: 32})) == pytest.approx(bigger.total_seconds + bigger.hidden_seconds, rel=1e-9)



def test_the_planner_weighs_the_wake_up_when_it_chooses() -> None:
    """A link whose collectives pay 10 ms after any compute: the solver alone would still split
    (it prices edges one by one); re-solving with the wake-up charged makes it replicate."""
    model, inputs = build_example("gpt", device="meta", batch=8, seq=64)
    costly = _with_wake(WakeCurve((0.0, 1e-6), (0.0, 0.01)))
    plain = plan_model(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget=None, training=False)
    assert plain.plan.collectives()  # the premise: without a wake-up, splitting pays
    chosen = plan_model(model, inputs, mesh_shape=(2,), hardware=costly, memory_budget=None, training=False).plan
    cost = CostModel(costly, 2)
    unaware = build_plan(plain.space, solve(plain.space, cost).chosen(plain.space), cost, hardware=costly.name, memory_budget=None)
    assert unaware.collectives() and unaware.wake_seconds == pytest.approx(0.01 * len(unaware.collectives()))  # each pays the plateau
    assert chosen.collectives() == [] and chosen.total_seconds < unaware.total_seconds
