"""Links measured per group size, and calibration's sampler that times noisy samples longer.

Calibration times collectives on groups of 2 and N ranks. Where the time does not scale with
the group size as the algorithm's cost says (a CPU running more ranks than it has cores, a
transport dominated by copies), one set of numbers cannot fit both: each measured group size
then gets its own link (``LinkProfile.measured_groups``), which prices every group of that size.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from cost_models import LinkProfile, ProfileError, collective_seconds, load_profile, write_profile
from cost_models.calibrate import CollectiveSample, KernelSample, build_profile, fit_all
from cost_models.profile import BandwidthKnee, CollectiveLink
from tests._profile_fns import assert_rejected, cpu_link_toml

KIB, MIB = 2**10, 2**20
SIZES = [4 * KIB * 4**k for k in range(8)]  # 4 KiB .. 64 MiB
TWO = LinkProfile(latency_seconds=0.0, bytes_per_s=1.4e9, call_overhead_seconds=5e-4, bandwidth_knees=(BandwidthKnee(4 * MIB, 6e8),))
# On 4 ranks each rank's share is smaller and the transfers overlap: faster per byte moved,
# which no algorithm's bytes-moved formula says (they all make 4 ranks move more).
FOUR = LinkProfile(latency_seconds=0.0, bytes_per_s=4e9, call_overhead_seconds=7e-4)


def _timings(kind: str) -> list[CollectiveSample]:
    return [CollectiveSample(kind, n, float(b), collective_seconds(link, kind, nbytes=b, group_size=n)) for n, link in ((2, TWO), (4, FOUR)) for b in SIZES]


def _kernels() -> list[KernelSample]:
    memory = [KernelSample("memory", "float32", n / 12, float(n), 1e-5 + n / 1e10) for n in SIZES]
    return memory + [KernelSample("matmul", "float32", 2.0 * m**3, 12.0 * m * m, 1e-5 + 2.0 * m**3 / 1e11) for m in (64, 256, 1024)]


def _calibrated(tmp_path: Path):
    samples = _timings("all_reduce") + _timings("all_to_all")
    report = fit_all(_kernels(), samples)
    profile = build_profile(report, name="groups", device_type="cpu", memory_capacity_nbytes=2**33, description="test")
    return samples, report, profile


def test_each_measured_group_size_is_priced_as_it_was_timed(tmp_path: Path) -> None:
    samples, report, profile = _calibrated(tmp_path)
    assert sorted(profile.intra_node.measured_groups) == [2, 4]
    for s in samples:
        priced = collective_seconds(profile.intra_node, s.collective, nbytes=s.nbytes, group_size=s.group_size)
        assert priced == pytest.approx(s.seconds, rel=1e-6), (s.collective, s.group_size, s.nbytes)
    # the joint fit, all that prices other group sizes, cannot follow both: the test needs that
    joint = dataclasses.replace(profile.intra_node, measured_groups={})
    worst = max(abs(collective_seconds(joint, s.collective, nbytes=s.nbytes, group_size=s.group_size) / s.seconds - 1) for s in samples)
    assert worst > 0.2
    assert collective_seconds(profile.intra_node, "all_to_all", nbytes=MIB, group_size=8) == collective_seconds(joint, "all_to_all", nbytes=MIB, group_size=8)
    # the report shows each group's own fit, the profile says where the numbers come from
    text = report.text()
    assert "measured groups (fitted on one group size alone" in text
    assert sum(1 for line in text.splitlines() if line.strip().startswith("all_to_all")) == 3  # joint, 2, 4
    assert "fitted on groups of 4 ranks alone" in profile.sources["links.intra_node.measured_groups.4"]
    again = load_profile(write_profile(profile, tmp_path / "groups.toml"))
    assert again == profile


def test_a_single_group_size_needs_no_measured_groups() -> None:
    samples = [s for s in _timings("all_reduce") if s.group_size == 4]
    report = fit_all(_kernels(), samples)
    assert report.group_fits == () and "measured groups" not in report.text()
    profile = build_profile(report, name="one", device_type="cpu", memory_capacity_nbytes=2**33, description="test")
    assert not profile.intra_node.measured_groups


def test_a_group_keeps_the_joint_fit_where_that_prices_it_better() -> None:
    """One link's timings with two knees: jointly both groups' large messages place both knees
    exactly; alone, a group has too few large messages for two, so it keeps the joint fit."""
    link = LinkProfile(latency_seconds=3e-5, bytes_per_s=2e9, call_overhead_seconds=1e-4, bandwidth_knees=(BandwidthKnee(3 * MIB, 1e9), BandwidthKnee(32 * MIB, 4e8)))
    samples = [CollectiveSample("all_gather", n, float(b), collective_seconds(link, "all_gather", nbytes=b, group_size=n)) for n in (2, 4) for b in SIZES]
    samples += _timings("all_reduce")
    report = fit_all(_kernels(), samples)
    assert not [f for f in report.group_fits if f.collective == "all_gather"]
    assert {f.group_sizes for f in report.group_fits if f.collective == "all_reduce"} == {(2,), (4,)}
    profile = build_profile(report, name="kept", device_type="cpu", memory_capacity_nbytes=2**33, description="test")
    for s in samples:
        if s.collective == "all_gather":
            assert collective_seconds(profile.intra_node, "all_gather", nbytes=s.nbytes, group_size=s.group_size) == pytest.approx(s.seconds, rel=1e-4)


def test_a_collective_not_fitted_alone_keeps_its_joint_numbers_in_the_group() -> None:
    # broadcast on 4 ranks took as long at 1 MiB as at 4 KiB: no fit of its own, but a joint one
    samples = _timings("all_reduce") + [CollectiveSample("broadcast", 2, float(b), 1e-4 + b / 1e9) for b in SIZES]
    samples += [CollectiveSample("broadcast", 4, float(b), 2e-3) for b in (4 * KIB, MIB)]
    report = fit_all(_kernels(), samples)
    assert {f.group_sizes for f in report.group_fits if f.collective == "broadcast"} == {(2,)}
    profile = build_profile(report, name="partial", device_type="cpu", memory_capacity_nbytes=2**33, description="test")
    joint = next(f for f in report.collectives if f.collective == "broadcast")
    four = profile.intra_node.measured_groups[4].collectives["broadcast"]
    assert (four.call_overhead_seconds, four.latency_seconds, four.bytes_per_s) == (joint.call_overhead_seconds, joint.latency_seconds, joint.bytes_per_s)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LinkProfile(latency_seconds=0.0, bytes_per_s=1e9, measured_groups={1: TWO}), "group size 1; expected an int >= 2"),
        (lambda: LinkProfile(latency_seconds=0.0, bytes_per_s=1e9, measured_groups={2: "fast"}), "measured_groups.2.*a LinkProfile"),
        (lambda: LinkProfile(latency_seconds=0.0, bytes_per_s=1e9, measured_groups={2: dataclasses.replace(TWO, measured_groups={4: FOUR})}),
         "measured groups of its own"),
    ],
)
def test_invalid_measured_groups_are_refused(make, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        make()


GROUPS_TOML = cpu_link_toml("groups-file") + """
[links.intra_node.measured_groups.4]
latency_seconds = 0.0
bytes_per_s = 4e9
call_overhead_seconds = 7e-4
algorithms = { broadcast = "tree" }

[links.intra_node.measured_groups.4.all_gather]
bytes_per_s = 1e9

[sources]
"links.intra_node.measured_groups.4" = "measured on 4 ranks"
"links.intra_node.measured_groups.4.all_gather.bytes_per_s" = "measured on 4 ranks"
"""


def test_measured_groups_load_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "groups.toml"
    path.write_text(GROUPS_TOML, encoding="utf-8")
    link = load_profile(path).intra_node
    four = link.measured_groups[4]
    assert four == LinkProfile(latency_seconds=0.0, bytes_per_s=4e9, call_overhead_seconds=7e-4, collectives={"all_gather": CollectiveLink(bytes_per_s=1e9)}, algorithms={"broadcast": "tree"})
    assert link.for_group(4) is four and link.for_group(2) is link
    assert collective_seconds(link, "all_gather", nbytes=4e6, group_size=4) == pytest.approx(7e-4 + 0.75 * 4e6 / 1e9)
    assert collective_seconds(link, "all_gather", nbytes=4e6, group_size=2) == pytest.approx(1e-4 + 5e-5 + 0.5 * 4e6 / 1.5e9)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("measured_groups.4]", "measured_groups.1]", r"field 'links\.intra_node\.measured_groups\.1' must be a group size: a whole number >= 2"),
        ("measured_groups.4]", "measured_groups.four]", r"field 'links\.intra_node\.measured_groups\.four' must be a group size"),
        ("bytes_per_s = 4e9", "bandwidth = 4e9", r"unknown field 'links\.intra_node\.measured_groups\.4\.bandwidth'"),
        ("bytes_per_s = 4e9", "bytes_per_s = -4e9", r"field 'links\.intra_node\.measured_groups\.4\.bytes_per_s' must be a positive number"),
        ("latency_seconds = 0.0\nbytes_per_s = 4e9", "bytes_per_s = 4e9", r"missing required field 'links\.intra_node\.measured_groups\.4\.latency_seconds'"),
        ('{ broadcast = "tree" }', '{ broadcast = "star" }', r"field 'links\.intra_node\.measured_groups\.4\.algorithms\.broadcast' must be one of"),
        ("[links.intra_node.measured_groups.4.all_gather]\nbytes_per_s = 1e9", "[links.intra_node.measured_groups.4.all_gather]\nbytes_per_sec = 1e9",
         r"unknown field 'links\.intra_node\.measured_groups\.4\.all_gather\.bytes_per_sec'"),
        ('"links.intra_node.measured_groups.4" =', '"links.intra_node.measured_groups.8" =', r"field 'sources' names 'links\.intra_node\.measured_groups\.8'"),
    ],
)
def test_malformed_measured_groups_name_file_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert_rejected(tmp_path, GROUPS_TOML, old, new, message)


# ------------------------------------------------------------------------------------------
# The sampler: more batches for a sample whose median is still uncertain


def test_median_relative_error_by_hand() -> None:
    from autotp.cost.calibrate import median_relative_error

    # n = 9: ranks 4 and 6 (sqrt(9)/2 = 1.5 either side of the 5th, rounded), (6 - 4) / 2 / 5
    assert median_relative_error([float(x) for x in (9, 1, 8, 2, 7, 3, 6, 4, 5)]) == pytest.approx(0.2)
    assert median_relative_error([3.0] * 12) == 0.0
    assert median_relative_error([1.0, 2.0]) == math.inf  # too few to say


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("precision", "expected"), [(0.0, 5), (1e9, 3)])
def test_noisy_samples_get_more_batches_up_to_the_limit(precision: float, expected: int) -> None:
    """No sample can be that precise: every one gets ``max_repeats``; every one already is: ``repeats``
    (3: fewer batches than that never count as precise)."""
    from autotp.cost.calibrate import CalibrationConfig, measure_rank
    from autotp.testing import run_on_ranks

    config = CalibrationConfig(
        device_type="cpu", matmul_shapes=((32, 32, 32),), dtypes=("float32",), memory_nbytes=(16 * KIB,), message_nbytes=(16 * KIB,),
        collectives=("all_reduce",), repeats=3, warmup=0, max_repeats=5, precision=precision, batch_seconds=0.005,
    )
    ranks = run_on_ranks(measure_rank, 2, config, timeout_seconds=180)
    counts = {len(times) for r in ranks for _, times in r.kernels + r.collectives}
    assert counts == {expected}
    assert config.repeats_text() == "3 to 5 repeats"
