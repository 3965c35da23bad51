"""Bandwidth knees: a link's time as a continuous piecewise-linear function of the bytes moved.

Prices by hand, which knees apply under per-collective overrides, the TOML form and its errors,
the calibration fit recovering known knees (and adding none to a straight line), and the
symbolic plan cost matching the numeric price.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import sympy

from cost_models import (
    BandwidthKnee,
    CollectiveLink,
    LinkProfile,
    ProfileError,
    collective_seconds,
    collective_terms,
    load_profile,
    roofline_seconds,
    select_algorithm,
    transfer_seconds,
    write_profile,
)
from cost_models.algorithms import Algorithm
from cost_models.calibrate import CollectiveSample, KernelSample, build_profile, fit_all, fit_collective
from cost_models.comm import PiecewiseLinearCost
from tests._profile_fns import assert_rejected

KIB, MIB = 2**10, 2**20
SIZES = [4 * KIB * 4**k for k in range(10)]  # 4 KiB .. 1 GiB: large messages 1 .. 1024 MiB

# o = 2e-5 s, alpha = 1e-5 s, beta = 1e9 B/s; past 1e6 bytes moved per rank, 5e8 B/s.
LINK = LinkProfile(latency_seconds=1e-5, bytes_per_s=1e9, call_overhead_seconds=2e-5, bandwidth_knees=(BandwidthKnee(1e6, 5e8),))


# ------------------------------------------------------------------------------------------
# Prices by hand


def test_ring_all_gather_on_two_ranks_with_one_knee() -> None:
    # n = 2 moves B/2 per rank in 1 step. B = 4e6: 2e6 moved, 1e6 of them past the knee at the
    # slower rate: 2e-5 + 1e-5 + 2e6 / 1e9 + 1e6 · (1/5e8 - 1/1e9) = 3e-5 + 2e-3 + 1e-3.
    assert collective_seconds(LINK, "all_gather", nbytes=4e6, group_size=2) == pytest.approx(3e-5 + 3e-3, rel=1e-12)
    # below the knee (B = 1e6: 5e5 moved) it is the straight line; at B = 2e6 both pieces meet
    assert collective_seconds(LINK, "all_gather", nbytes=1e6, group_size=2) == pytest.approx(3e-5 + 5e-4, rel=1e-12)
    assert collective_seconds(LINK, "all_gather", nbytes=2e6, group_size=2) == pytest.approx(3e-5 + 1e-3, rel=1e-12)
    # in full bytes the knee sits at k / fraction = 2e6 and adds fraction · (2e-9 - 1e-9) per byte
    (curve,) = collective_terms(LINK, "all_gather", group_size=2)
    assert curve.algorithm is Algorithm.RING and isinstance(curve, PiecewiseLinearCost)
    assert (curve.fixed_seconds, curve.seconds_per_byte) == pytest.approx((3e-5, 0.5e-9), rel=1e-12)
    ((at, extra),) = curve.knees
    assert (at, extra) == pytest.approx((2e6, 0.5e-9), rel=1e-12)
    assert curve.seconds(4e6) == collective_seconds(LINK, "all_gather", nbytes=4e6, group_size=2)
    assert curve.seconds(0) == 0.0


def test_transfer_seconds_sums_each_knees_extra_past_its_start() -> None:
    knees = (BandwidthKnee(1e6, 5e8), BandwidthKnee(3e6, 2.5e8))
    # 4e6 bytes: 4e6 / 1e9 + (4e6 - 1e6) · 1e-9 + (4e6 - 3e6) · (4e-9 - 2e-9) = 4e-3 + 3e-3 + 2e-3
    assert transfer_seconds(4e6, bytes_per_s=1e9, knees=knees) == pytest.approx(9e-3, rel=1e-12)
    assert transfer_seconds(5e5, bytes_per_s=1e9, knees=knees) == pytest.approx(5e-4, rel=1e-12)
    assert transfer_seconds(4e6, bytes_per_s=1e9) == pytest.approx(4e-3, rel=1e-12)


def test_auto_weighs_each_algorithms_knee_at_its_own_message_size() -> None:
    # n = 8 all_reduce, o = 0, alpha = 1e-3, beta = 1e9: ring 14 steps and 1.75·B moved, tree
    # 6 steps and 6·B. Without knees, B = 1e6: ring 0.014 + 0.00175 = 0.01575 s, tree
    # 0.006 + 0.006 = 0.012 s: tree wins. A knee at 2e6 moved to 1e8 B/s catches only the tree
    # (6e6 moved, 4e6 past it: + 4e6 · (1e-8 - 1e-9) = 0.036 s), and the ring wins.
    straight = LinkProfile(latency_seconds=1e-3, bytes_per_s=1e9, algorithms={"all_reduce": "auto"})
    bent = dataclasses.replace(straight, bandwidth_knees=(BandwidthKnee(2e6, 1e8),))
    assert select_algorithm(straight, "all_reduce", nbytes=1e6, group_size=8) is Algorithm.TREE
    assert collective_seconds(straight, "all_reduce", nbytes=1e6, group_size=8) == pytest.approx(0.012, rel=1e-12)
    assert select_algorithm(bent, "all_reduce", nbytes=1e6, group_size=8) is Algorithm.RING
    assert collective_seconds(bent, "all_reduce", nbytes=1e6, group_size=8) == pytest.approx(0.01575, rel=1e-12)
    assert collective_seconds(bent, "all_reduce", nbytes=1e6, group_size=8, algorithm="tree") == pytest.approx(0.048, rel=1e-12)
    ring, tree = collective_terms(bent, "all_reduce", group_size=8)
    assert ring.knees[0] == pytest.approx((2e6 / 1.75, 1.75 * 9e-9)) and tree.knees[0] == pytest.approx((2e6 / 6, 6 * 9e-9))
    # small messages are below both knees: tree, as without them
    assert select_algorithm(bent, "all_reduce", nbytes=1e3, group_size=8) is Algorithm.TREE


def test_an_override_that_sets_bandwidth_replaces_the_knees() -> None:
    own = (BandwidthKnee(4e6, 1e8),)
    link = dataclasses.replace(LINK, collectives={
        "all_gather": CollectiveLink(latency_seconds=0.0),  # no bandwidth: the link's beta and knees
        "broadcast": CollectiveLink(bytes_per_s=4e9),  # bandwidth, no knees: a straight line
        "reduce_scatter": CollectiveLink(bytes_per_s=2e9, bandwidth_knees=own),  # its own knees
    })
    assert link.knees("all_reduce") == link.knees("all_gather") == LINK.bandwidth_knees
    assert link.knees("broadcast") == ()
    assert link.knees("reduce_scatter") == own
    # n = 2, B = 1e7. all_gather: 2e-5 + 0 + 5e6 / 1e9 + 4e6 · 1e-9
    assert collective_seconds(link, "all_gather", nbytes=1e7, group_size=2) == pytest.approx(2e-5 + 9e-3, rel=1e-12)
    # broadcast moves all 1e7 bytes: 2e-5 + 1e-5 + 1e7 / 4e9, no knee
    assert collective_seconds(link, "broadcast", nbytes=1e7, group_size=2) == pytest.approx(3e-5 + 2.5e-3, rel=1e-12)
    # reduce_scatter: 3e-5 + 5e6 / 2e9 + 1e6 · (1e-8 - 5e-10)
    assert collective_seconds(link, "reduce_scatter", nbytes=1e7, group_size=2) == pytest.approx(3e-5 + 2.5e-3 + 9.5e-3, rel=1e-12)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BandwidthKnee(-1.0, 1e9), r"BandwidthKnee: field 'moved_nbytes' must be a positive number, got float -1\.0"),
        (lambda: BandwidthKnee(1e6, 0.0), r"BandwidthKnee: field 'bytes_per_s' must be a positive number"),
        (lambda: BandwidthKnee(1e6, "5e8"), r"BandwidthKnee: field 'bytes_per_s' must be a number, got str '5e8'"),
        (lambda: dataclasses.replace(LINK, bandwidth_knees=(BandwidthKnee(2e6, 1e8), BandwidthKnee(1e6, 1e8))),
         r"LinkProfile: field 'bandwidth_knees' must be knees in strictly increasing moved_nbytes"),
        (lambda: dataclasses.replace(LINK, bandwidth_knees=(BandwidthKnee(1e6, 1e8), BandwidthKnee(1e6, 5e7))),
         r"LinkProfile: field 'bandwidth_knees' must be knees in strictly increasing moved_nbytes"),
        (lambda: dataclasses.replace(LINK, bandwidth_knees=((1e6, 1e8),)), r"LinkProfile: field 'bandwidth_knees' must be a sequence of BandwidthKnee"),
        (lambda: CollectiveLink(bytes_per_s=1e9, bandwidth_knees=(BandwidthKnee(2e6, 1e8), BandwidthKnee(1e6, 1e8))),
         r"CollectiveLink: field 'bandwidth_knees' must be knees in strictly increasing"),
        (lambda: CollectiveLink(latency_seconds=0.0, bandwidth_knees=(BandwidthKnee(1e6, 1e8),)),
         r"CollectiveLink: field 'bandwidth_knees' needs 'bytes_per_s' too"),
    ],
)
def test_invalid_knees_are_refused(make, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        make()


# ------------------------------------------------------------------------------------------
# TOML

KNEED_TOML = """\
version = 2
name = "kneed"
device_type = "cpu"
source = "test fixture"

[compute]
peak_flops_per_s = { float32 = 1e11 }
compute_efficiency = 0.5
kernel_launch_seconds = 1e-5

[memory]
bytes_per_s = 2e10
capacity_nbytes = 17179869184
efficiency = 0.7

[links]
devices_per_node = 4

[links.intra_node]
latency_seconds = 5e-5
bytes_per_s = 1.5e9
call_overhead_seconds = 1e-4
bandwidth_knees = [{ moved_nbytes = 33554432, bytes_per_s = 5e8 }, { moved_nbytes = 134217728, bytes_per_s = 2.5e8 }]

[links.intra_node.all_gather]
bytes_per_s = 1e9
bandwidth_knees = [{ moved_nbytes = 8388608, bytes_per_s = 4e8 }]

[links.intra_node.broadcast]
latency_seconds = 0.0

[links.inter_node]
latency_seconds = 1e-4
bytes_per_s = 1e9
call_overhead_seconds = 1e-4
bandwidth_knees = [{ moved_nbytes = 1048576, bytes_per_s = 5e8 }]

[sources]
"links.intra_node.bandwidth_knees" = "measured: gloo over loopback past the 32 MiB L3"
"links.intra_node.all_gather.bandwidth_knees" = "measured"
"links.inter_node.bandwidth_knees" = "estimate"
"""


def _write(tmp_path: Path, text: str, name: str = "kneed.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_knees_load_from_toml_and_write_back_equal(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, KNEED_TOML))
    intra = profile.intra_node
    assert intra.bandwidth_knees == (BandwidthKnee(32 * MIB, 5e8), BandwidthKnee(128 * MIB, 2.5e8))
    assert intra.knees("broadcast") == intra.bandwidth_knees  # override without bandwidth
    assert intra.knees("all_gather") == (BandwidthKnee(8 * MIB, 4e8),)
    assert profile.inter_node.knees("all_reduce") == (BandwidthKnee(MIB, 5e8),)
    again = write_profile(profile, tmp_path / "again.toml")
    text = again.read_text(encoding="utf-8")
    assert "bandwidth_knees = [{ moved_nbytes = 33554432, bytes_per_s = 500000000.0 }, { moved_nbytes = 134217728, bytes_per_s = 250000000.0 }]" in text
    assert load_profile(again) == profile
    straight = dataclasses.replace(profile, intra_node=dataclasses.replace(intra, bandwidth_knees=(), collectives={}), sources={})
    assert "bandwidth_knees" not in write_profile(straight, tmp_path / "straight.toml").read_text(encoding="utf-8").split("[links.inter_node]")[0]


KNEE = "{ moved_nbytes = 33554432, bytes_per_s = 5e8 }"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (KNEE, "{ moved_nbytes = 33554432 }", r"missing required field 'links\.intra_node\.bandwidth_knees\[0\]\.bytes_per_s' \(bandwidth past the knee"),
        (KNEE, '{ moved_nbytes = 33554432, bytes_per_s = "0.5 GB/s" }', r"field 'links\.intra_node\.bandwidth_knees\[0\]\.bytes_per_s' must be a number .*got str '0\.5 GB/s'"),
        (KNEE, "{ moved_nbytes = 33554432, bytes_per_s = -5e8 }", r"field 'links\.intra_node\.bandwidth_knees\[0\]\.bytes_per_s' must be a positive number"),
        (KNEE, "{ moved_nbytes = 33554432, bytes_per_s = 500 }", r"field 'links\.intra_node\.bandwidth_knees\[0\]\.bytes_per_s' must be between 1e\+06 and 1e\+14 bytes per second"),
        (KNEE, "{ moved_nbytes = 0, bytes_per_s = 5e8 }", r"field 'links\.intra_node\.bandwidth_knees\[0\]\.moved_nbytes' must be a positive number"),
        (KNEE, "{ moved_nbytes = 268435456, bytes_per_s = 5e8 }", r"field 'links\.intra_node\.bandwidth_knees' must be knees in strictly increasing moved_nbytes"),
        (KNEE, "{ moved_nbytes = 33554432, bytes_per_sec = 5e8 }", r"unknown field 'links\.intra_node\.bandwidth_knees\[0\]\.bytes_per_sec'.*did you mean 'bytes_per_s'\?"),
        (f"bandwidth_knees = [{KNEE}, ", "bandwidth_knees = [5e8, ", r"field 'links\.intra_node\.bandwidth_knees\[0\]' must be a table"),
        ("bandwidth_knees = [{ moved_nbytes = 1048576, bytes_per_s = 5e8 }]", "bandwidth_knees = 5e8", r"field 'links\.inter_node\.bandwidth_knees' must be an array of"),
        ("bytes_per_s = 1e9\nbandwidth_knees", "bandwidth_knees", r"field 'links\.intra_node\.all_gather\.bandwidth_knees' needs 'links\.intra_node\.all_gather\.bytes_per_s' too"),
        ('"links.inter_node.bandwidth_knees" = "estimate"', '"links.intra_node.broadcast.bandwidth_knees" = "estimate"',
         r"field 'sources' names 'links\.intra_node\.broadcast\.bandwidth_knees', which is not a field"),
        ("version = 2", "version = 1", r"needs version = 2"),
    ],
)
def test_malformed_knees_name_file_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert_rejected(tmp_path, KNEED_TOML, old, new, message)


# ------------------------------------------------------------------------------------------
# The fit


def _samples(kind: str, link: LinkProfile, groups: tuple[int, ...], noise: float = 0.0) -> list[CollectiveSample]:
    """Timings priced by ``link``, each ± ``noise`` (relative, alternating sign)."""
    out = []
    for n in groups:
        for k, b in enumerate(SIZES):
            seconds = collective_seconds(link, kind, nbytes=b, group_size=n) * (1 + noise * (-1) ** k)
            out.append(CollectiveSample(kind, n, float(b), seconds))
    return out


@pytest.mark.parametrize(
    ("kind", "knees"),
    [
        # knees at moved sizes that were measured (ring all_gather on 2 ranks moves B/2, on 4 3B/4)
        ("all_gather", (BandwidthKnee(8 * MIB, 5e8),)),
        ("all_gather", (BandwidthKnee(3 * MIB, 1e9), BandwidthKnee(32 * MIB, 4e8))),
        # pairwise all_to_all moves B/4 on 2 ranks, 3B/16 on 4; a knee where bandwidth rises
        ("all_to_all", (BandwidthKnee(4 * MIB, 1e9), BandwidthKnee(12 * MIB, 1.5e9), BandwidthKnee(64 * MIB, 4e8))),
        ("all_reduce", (BandwidthKnee(16 * MIB, 6e8),)),
    ],
)
def test_fit_recovers_known_knees(kind: str, knees: tuple[BandwidthKnee, ...]) -> None:
    link = LinkProfile(latency_seconds=3e-5, bytes_per_s=2e9, call_overhead_seconds=1e-4, bandwidth_knees=knees)
    fit = fit_collective(_samples(kind, link, (2, 4)))
    assert fit.call_overhead_seconds == pytest.approx(1e-4, rel=0.01)
    assert fit.latency_seconds == pytest.approx(3e-5, rel=0.01)
    assert fit.bytes_per_s == pytest.approx(2e9, rel=0.01)
    assert [k.moved_nbytes for k in fit.bandwidth_knees] == [k.moved_nbytes for k in knees]
    assert [k.bytes_per_s for k in fit.bandwidth_knees] == pytest.approx([k.bytes_per_s for k in knees], rel=0.01)
    assert fit.median_rel_error_large < 1e-6


def test_one_group_size_recovers_a_knee_too() -> None:
    link = LinkProfile(latency_seconds=0.0, bytes_per_s=2e9, call_overhead_seconds=1e-4, bandwidth_knees=(BandwidthKnee(8 * MIB, 5e8),))
    fit = fit_collective(_samples("reduce_scatter", link, (2,)))
    (knee,) = fit.bandwidth_knees
    assert knee.moved_nbytes == 8 * MIB and knee.bytes_per_s == pytest.approx(5e8, rel=0.01)
    assert fit.call_overhead_seconds == pytest.approx(1e-4, rel=0.01) and fit.bytes_per_s == pytest.approx(2e9, rel=0.01)


@pytest.mark.parametrize("noise", [0.0, 0.005])
@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "all_to_all", "broadcast"])
def test_a_straight_line_gets_no_knee(kind: str, noise: float) -> None:
    link = LinkProfile(latency_seconds=3e-5, bytes_per_s=2e9, call_overhead_seconds=1e-4)
    fit = fit_collective(_samples(kind, link, (2, 4), noise))
    assert fit.bandwidth_knees == () and fit.knees_text() == "-"
    assert fit.bytes_per_s == pytest.approx(2e9, rel=0.02)


def test_a_knee_must_pay_for_itself() -> None:
    # a 2% bend past 8 MiB lowers the error, but a line is already within 1% RMS of it
    link = LinkProfile(latency_seconds=3e-5, bytes_per_s=2e9, call_overhead_seconds=1e-4, bandwidth_knees=(BandwidthKnee(8 * MIB, 1.98e9),))
    assert fit_collective(_samples("all_gather", link, (2, 4))).bandwidth_knees == ()


def test_built_profile_carries_the_knees_and_the_report_shows_them(tmp_path: Path) -> None:
    base = LinkProfile(latency_seconds=3e-5, bytes_per_s=2e9, call_overhead_seconds=1e-4, bandwidth_knees=(BandwidthKnee(16 * MIB, 5e8),))
    gather = dataclasses.replace(base, bytes_per_s=1e9, bandwidth_knees=(BandwidthKnee(12 * MIB, 4e8),))
    to_all = dataclasses.replace(base, bandwidth_knees=())
    collectives = _samples("all_reduce", base, (2, 4)) + _samples("all_gather", gather, (2, 4)) + _samples("all_to_all", to_all, (2, 4))
    box = load_profile("cpu-gloo")  # any roofline will do for the kernels
    kernels = [KernelSample("memory", "float32", n / 12, float(n), roofline_seconds(box, flops=n / 12, nbytes=n)) for n in SIZES[:8]]
    kernels += [KernelSample("matmul", "float32", 2.0 * m**3, 12.0 * m * m, roofline_seconds(box, flops=2.0 * m**3, nbytes=12.0 * m * m)) for m in (64, 256, 1024)]
    report = fit_all(kernels, collectives)
    text = report.text()
    assert re.search(r"all_reduce .* 0\.0%\s+16MiB:0\.5GB/s$", text, re.MULTILINE), text
    assert re.search(r"all_gather .*\s12MiB:0\.4GB/s$", text, re.MULTILINE) and re.search(r"all_to_all .*\s-$", text, re.MULTILINE), text
    profile = build_profile(report, name="box", device_type="cpu", memory_capacity_nbytes=2**34, description="box, 4 ranks")
    link = profile.intra_node
    assert [(k.moved_nbytes, k.bytes_per_s) for k in link.bandwidth_knees] == [(16 * MIB, pytest.approx(5e8, rel=1e-6))]
    assert [(k.moved_nbytes, k.bytes_per_s) for k in link.knees("all_gather")] == [(12 * MIB, pytest.approx(4e8, rel=1e-6))]
    assert link.knees("all_to_all") == ()  # its override sets bandwidth and no knees: the link's do not apply
    assert "links.intra_node.bandwidth_knees" in profile.sources
    for kind, truth in (("all_reduce", base), ("all_gather", gather), ("all_to_all", to_all)):
        for b in (64 * KIB, 16 * MIB, 256 * MIB):
            assert collective_seconds(link, kind, nbytes=b, group_size=4) == pytest.approx(collective_seconds(truth, kind, nbytes=b, group_size=4), rel=1e-6)
    assert load_profile(write_profile(profile, tmp_path / "box.toml", header=text)) == profile


# ------------------------------------------------------------------------------------------
# Symbolic plan costs


def test_step_lines_price_knees_exactly_as_the_planner() -> None:
    from autotp.cost.symbolic import StepLine

    link = dataclasses.replace(LINK, algorithms={"all_reduce": "auto"}, bandwidth_knees=(BandwidthKnee(1e6, 5e8), BandwidthKnee(4e6, 2e8)))
    size = sympy.Symbol("N", positive=True)
    for kind, n in (("all_reduce", 8), ("all_gather", 4), ("all_to_all", 4)):
        lines = [StepLine(c.fixed_seconds, c.seconds_per_byte, c.knees) for c in collective_terms(link, kind, group_size=n)]
        expr = sympy.Min(*(line.expr(size) for line in lines))
        for nbytes in (1e3, 1.5e6, 3e6, 2e7, 1e9):
            price = collective_seconds(link, kind, nbytes=nbytes, group_size=n)
            assert min(line.seconds(nbytes) for line in lines) == price
            assert float(expr.subs(size, nbytes)) == pytest.approx(price, rel=1e-12)


@pytest.mark.timeout(120)
def test_cost_expression_with_knees_equals_the_plans_total() -> None:
    import autotp
    from autotp.cost.symbolic import B, StepTerm, T, terms_seconds
    from autotp.examples import build_example

    profile = load_profile("a100-pcie")
    knees = (BandwidthKnee(64 * KIB, 2e10), BandwidthKnee(MIB, 1.5e10))  # below the plan's all-reduces
    profile = dataclasses.replace(profile, intra_node=dataclasses.replace(profile.intra_node, bandwidth_knees=knees))
    gpt = {"n_embd": 512, "n_head": 8, "n_layer": 1, "vocab_size": 512, "block_size": 64}
    model, inputs = build_example("gpt", device="meta", batch=64, seq=32, **gpt)
    plan = autotp.plan(model, inputs, mesh_shape=(4,), hardware=profile, training=True, symbolic=True)
    steps = [t for t in plan.cost_terms if isinstance(t, StepTerm) and t.step == "all_reduce"]
    assert steps and all(t.nbytes(64, 32) > max(at for at, _ in t.lines[0].knees) for t in steps)  # past both knees
    expr = plan.cost_expression()
    assert float(expr.subs({B: 64, T: 32})) == pytest.approx(plan.total_seconds + plan.hidden_seconds, rel=1e-9)  # overlap is not symbolic
    for batch, seq in ((8, 32), (256, 16)):
        assert float(expr.subs({B: batch, T: seq})) == pytest.approx(terms_seconds(plan.cost_terms, batch, seq), rel=1e-9)
    for t in steps:
        assert t.seconds(64, 32) == collective_seconds(profile.intra_node, "all_reduce", nbytes=t.nbytes(64, 32), group_size=4)
