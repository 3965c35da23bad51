"""Cost-model arithmetic, checked against numbers worked out by hand, and profile validation."""

from __future__ import annotations

import dataclasses
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cost_models import (
    Collective,
    CollectiveLink,
    HardwareProfile,
    LinkProfile,
    ProfileError,
    Roofline,
    available_profiles,
    bytes_moved_per_rank,
    collective_seconds,
    collective_terms,
    latency_steps,
    load_profile,
    matmul_seconds,
    peak_live_nbytes,
    profile_to_toml,
    roofline,
    roofline_seconds,
    select_algorithm,
)

# A profile with round numbers so the expected times can be computed by hand.
ROUND = HardwareProfile(
    name="round",
    device_type="cpu",
    peak_flops_per_s={"float32": 1e12, "bfloat16": 4e12},
    memory_bytes_per_s=1e11,
    memory_capacity_nbytes=2**30,
    compute_efficiency=0.5,  # achieved: 5e11 fp32 FLOP/s, 2e12 bf16 FLOP/s
    memory_efficiency=0.5,  # achieved: 5e10 B/s
    kernel_launch_seconds=1e-5,
    intra_node=LinkProfile(latency_seconds=1e-5, bytes_per_s=1e9),
    source="test fixture",
)

VALID_TOML = """\
version = 1
name = "tiny"
device_type = "cpu"
source = "test fixture"

[compute]
peak_flops_per_s = { float32 = 1e11, float64 = 5e10 }
compute_efficiency = 0.5
kernel_launch_seconds = 1e-5

[memory]
bytes_per_s = 2e10
capacity_nbytes = 17179869184
efficiency = 0.7

[links.intra_node]
latency_seconds = 5e-5
bytes_per_s = 1.5e9
call_overhead_seconds = 1e-4
"""


def _write(tmp_path: Path, text: str, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _replace_line(text: str, old: str, new: str) -> str:
    assert old in text, old  # guards the test itself, not user input
    return text.replace(old, new, 1)


# ------------------------------------------------------------------------------------------
# Collectives
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected_fraction"),
    [
        (Collective.ALL_REDUCE, 1.5),  # 2·(4-1)/4
        (Collective.ALL_GATHER, 0.75),  # (4-1)/4
        (Collective.REDUCE_SCATTER, 0.75),  # (4-1)/4
        (Collective.ALL_TO_ALL, 0.1875),  # (4-1)/4² = 3/16
    ],
)
def test_bytes_moved_per_rank_ring_n4(kind: Collective, expected_fraction: float) -> None:
    nbytes = 1024.0
    assert bytes_moved_per_rank(kind, nbytes=nbytes, group_size=4) == pytest.approx(
        expected_fraction * nbytes
    )


@pytest.mark.parametrize(
    ("kind", "expected_steps"),
    [("all_reduce", 6), ("all_gather", 3), ("reduce_scatter", 3), ("all_to_all", 3)],
)
def test_latency_steps_n4(kind: str, expected_steps: int) -> None:
    assert latency_steps(kind, group_size=4) == expected_steps


def test_all_reduce_seconds_by_hand() -> None:
    # 1 GB over n = 4 at alpha = 1e-5 s, beta = 1e9 B/s: 6 · 1e-5 + 1.5e9 / 1e9.
    seconds = collective_seconds(ROUND.intra_node, "all_reduce", nbytes=1e9, group_size=4)
    assert seconds == pytest.approx(6e-5 + 1.5)


def test_all_gather_and_reduce_scatter_seconds_by_hand() -> None:
    # n = 8: 7 · 1e-5 + 7/8 · 8e8 / 1e9 = 7e-5 + 0.7.
    for kind in (Collective.ALL_GATHER, Collective.REDUCE_SCATTER):
        seconds = collective_seconds(ROUND.intra_node, kind, nbytes=8e8, group_size=8)
        assert seconds == pytest.approx(7e-5 + 0.7)


def test_all_to_all_seconds_by_hand() -> None:
    # n = 2, B = 1e9: each rank holds 5e8 and sends half of it, 2.5e8 bytes, in one message.
    seconds = collective_seconds(ROUND.intra_node, "all_to_all", nbytes=1e9, group_size=2)
    assert seconds == pytest.approx(1e-5 + 0.25)


def test_h100_all_reduce_example_from_docstring() -> None:
    link = load_profile("h100-sxm").intra_node
    seconds = collective_seconds(link, Collective.ALL_REDUCE, nbytes=1e9, group_size=4)
    assert seconds == pytest.approx(1e-5 + 6 * 3e-6 + 1.5e9 / 4.5e11)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_all_to_all_moves_n_times_less_than_all_gather(n: int) -> None:
    gather = bytes_moved_per_rank("all_gather", nbytes=1e6, group_size=n)
    to_all = bytes_moved_per_rank("all_to_all", nbytes=1e6, group_size=n)
    assert gather == pytest.approx(n * to_all)


@pytest.mark.parametrize("kind", list(Collective))
def test_group_of_one_or_empty_tensor_costs_nothing(kind: Collective) -> None:
    assert collective_seconds(ROUND.intra_node, kind, nbytes=1e9, group_size=1) == 0.0
    assert bytes_moved_per_rank(kind, nbytes=1e9, group_size=1) == 0.0
    assert latency_steps(kind, group_size=1) == 0
    assert collective_seconds(ROUND.intra_node, kind, nbytes=0, group_size=4) == 0.0


def test_collective_accepts_strings_and_prints_its_value() -> None:
    assert Collective("reduce_scatter") is Collective.REDUCE_SCATTER
    assert str(Collective.ALL_TO_ALL) == "all_to_all"


def test_unknown_collective_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown collective 'gather'.*all_reduce.*broadcast"):
        collective_seconds(ROUND.intra_node, "gather", nbytes=1.0, group_size=2)


@pytest.mark.parametrize(
    ("group_size", "error"),
    [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)],
)
def test_bad_group_size_rejected(group_size: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="group_size"):
        bytes_moved_per_rank("all_reduce", nbytes=1.0, group_size=group_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("nbytes", [-1.0, float("nan"), float("inf")])
def test_bad_nbytes_rejected(nbytes: float) -> None:
    with pytest.raises(ValueError, match="nbytes"):
        collective_seconds(ROUND.intra_node, "all_gather", nbytes=nbytes, group_size=2)


# ------------------------------------------------------------------------------------------
# Roofline
# ------------------------------------------------------------------------------------------


def test_big_matmul_is_compute_bound() -> None:
    # (1024, 1024) @ (1024, 1024) fp32: 2·1024³ = 2.147e9 FLOPs, 3·1024²·4 = 1.26e7 bytes.
    # compute 2.147e9 / 5e11 = 4.29e-3 s  >  memory 1.26e7 / 5e10 = 2.5e-4 s.
    flops, nbytes = 2 * 1024**3, 3 * 1024**2 * 4
    seconds = roofline_seconds(ROUND, flops=flops, nbytes=nbytes)
    assert seconds == pytest.approx(1e-5 + flops / 5e11)


def test_elementwise_is_memory_bound() -> None:
    # fp32 add of 2^20 elements: 2^20 FLOPs, 3·4·2^20 bytes.
    # compute 1.05e6 / 5e11 = 2.1e-6 s  <  memory 1.26e7 / 5e10 = 2.5e-4 s.
    flops, nbytes = 2**20, 12 * 2**20
    seconds = roofline_seconds(ROUND, flops=flops, nbytes=nbytes)
    assert seconds == pytest.approx(1e-5 + nbytes / 5e10)


def test_tiny_kernel_pays_the_launch_floor() -> None:
    # 8 bytes / 5e10 B/s = 1.6e-10 s of work under a 1e-5 s launch: the floor dominates.
    seconds = roofline_seconds(ROUND, flops=1, nbytes=8)
    assert seconds == pytest.approx(1e-5 + 1.6e-10)
    assert seconds == pytest.approx(ROUND.kernel_launch_seconds, rel=1e-4)


def test_no_work_means_no_kernel() -> None:
    assert roofline_seconds(ROUND, flops=0, nbytes=0) == 0.0


def test_dtype_selects_peak_and_unknown_dtype_falls_back_to_float32() -> None:
    flops = 1e12  # compute-bound on every dtype here: nbytes = 0
    assert roofline_seconds(ROUND, flops=flops, nbytes=0, dtype="bfloat16") == pytest.approx(
        1e-5 + flops / 2e12
    )
    assert ROUND.flops_per_s("torch.bfloat16") == 4e12
    assert ROUND.flops_per_s("int64") == ROUND.flops_per_s("float32") == 1e12


def test_h100_matmul_example_from_docstring() -> None:
    h100 = load_profile("h100-sxm")
    flops, nbytes = 2 * 4096**3, 3 * 4096**2 * 2
    seconds = roofline_seconds(h100, flops=flops, nbytes=nbytes, dtype="bfloat16")
    assert seconds == pytest.approx(5e-6 + flops / (9.895e14 * 0.7))
    assert seconds == pytest.approx(203.4e-6, rel=1e-3)


def test_matmul_pays_its_own_launch_and_its_weight_fetch_by_hand() -> None:
    # 256 x 128 x 128 fp32 on ROUND (5e11 FLOP/s, 5e10 B/s) with a 3 us matmul launch and 8e9 B/s
    # for the weight: 8.39e6 / 5e11 = 16.78 us of compute (memory 3.28e5 B / 5e10 = 6.55 us is
    # less), plus 65536 / 8e9 = 8.19 us for the (128, 128) weight.
    weighty = dataclasses.replace(ROUND, matmul_launch_seconds=3e-6, matmul_weight_bytes_per_s=8e9)
    flops, nbytes, weight = 2.0 * 256 * 128 * 128, 4.0 * (256 * 128 * 2 + 128 * 128), 4.0 * 128 * 128
    assert matmul_seconds(weighty, flops=flops, nbytes=nbytes, weight_nbytes=weight) == pytest.approx(3e-6 + flops / 5e11 + weight / 8e9)
    # half the tokens halve the compute but not the weight's fetch
    half = matmul_seconds(weighty, flops=flops / 2, nbytes=nbytes / 2, weight_nbytes=weight)
    assert half == pytest.approx(3e-6 + flops / 2 / 5e11 + weight / 8e9)
    # without the two fields a matmul is its roofline, whatever its weight
    assert matmul_seconds(ROUND, flops=flops, nbytes=nbytes, weight_nbytes=weight) == roofline_seconds(ROUND, flops=flops, nbytes=nbytes)
    assert matmul_seconds(weighty, flops=0, nbytes=0) == 0.0


@pytest.mark.parametrize(("flops", "nbytes"), [(-1.0, 0.0), (0.0, -1.0), (float("nan"), 1.0)])
def test_negative_or_nan_work_rejected(flops: float, nbytes: float) -> None:
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        roofline_seconds(ROUND, flops=flops, nbytes=nbytes)


# ------------------------------------------------------------------------------------------
# Profiles: loading
# ------------------------------------------------------------------------------------------


def test_builtin_profiles_are_available() -> None:
    assert {"h100-sxm", "h200", "a100-sxm", "a100-pcie", "l40s", "cpu-gloo"} <= set(available_profiles())


@pytest.mark.parametrize("name", available_profiles())
def test_every_builtin_profile_loads_and_names_itself(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.device_type in ("cuda", "cpu")
    assert "float32" in profile.peak_flops_per_s
    assert profile.source


def test_builtin_numbers() -> None:
    h100 = load_profile("h100-sxm")
    assert h100.flops_per_s("float32") == 6.7e13  # full fp32, PyTorch's default
    assert h100.intra_node.bytes_per_s == 4.5e11
    a100 = load_profile("a100-pcie")
    assert a100.intra_node.bytes_per_s < h100.intra_node.bytes_per_s / 10  # the slow link
    cpu = load_profile("cpu-gloo")
    assert cpu.device_type == "cpu"
    assert cpu.intra_node == LinkProfile(latency_seconds=5e-5, bytes_per_s=1.5e9, call_overhead_seconds=1e-4)


def test_load_by_path_str_pathlike_and_relative_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, VALID_TOML)
    by_str = load_profile(str(path))
    by_path = load_profile(path)
    monkeypatch.chdir(tmp_path)
    by_relative = load_profile("tiny.toml")
    assert by_str == by_path == by_relative
    assert by_str.name == "tiny"
    assert by_str.memory_capacity_nbytes == 17179869184
    assert isinstance(by_str.memory_capacity_nbytes, int)
    assert by_str.flops_per_s("float64") == 5e10
    assert by_str.intra_node == LinkProfile(latency_seconds=5e-5, bytes_per_s=1.5e9, call_overhead_seconds=1e-4)


def test_profiles_are_frozen_hashable_and_picklable() -> None:
    profile = load_profile("h100-sxm")
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.memory_bytes_per_s = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        profile.peak_flops_per_s["float32"] = 1.0  # type: ignore[index]
    assert pickle.loads(pickle.dumps(profile)) == profile
    assert {profile: 1}[load_profile("h100-sxm")] == 1


def test_unknown_profile_name_lists_available_ones() -> None:
    with pytest.raises(ProfileError, match=r"unknown hardware profile 'h900'.*a100-pcie, a100-sxm, cpu-gloo, h100-sxm, h200, l40s"):
        load_profile("h900")


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ProfileError, match=re.escape(f"{missing}: no such profile file")):
        load_profile(missing)


# ------------------------------------------------------------------------------------------
# Profiles: malformed files name the file and the field
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "bytes_per_s = 2e10\n",
            "",
            r"missing required field 'memory\.bytes_per_s' \(peak memory bandwidth",
        ),
        (
            "bytes_per_s = 1.5e9",
            "bytes_per_s = -1.5e9",
            r"field 'links\.intra_node\.bytes_per_s' must be a positive number "
            r".*got float -1500000000\.0",
        ),
        (
            "efficiency = 0.7",
            "efficiency = 1.5",
            r"field 'memory\.efficiency' must be a fraction in \(0, 1\] .*got float 1\.5",
        ),
        (
            "compute_efficiency = 0.5",
            "compute_efficiency = 0",
            r"field 'compute\.compute_efficiency' must be a fraction in \(0, 1\]",
        ),
        (
            "version = 1",
            "version = 3",
            r"field 'version' must be 2 "
            r"\(or 1, the older schema; no other profile schema exists\), got int 3",
        ),
        ("version = 1\n", "", r"missing required field 'version'"),
        (
            "latency_seconds = 5e-5",
            'latency_seconds = "fast"',
            r"field 'links\.intra_node\.latency_seconds' must be a number .*got str 'fast'",
        ),
        (
            "latency_seconds = 5e-5",
            "latency_seconds = true",
            r"field 'links\.intra_node\.latency_seconds' must be a number .*got bool True",
        ),
        (
            "latency_seconds = 5e-5",
            "latency_seconds = nan",
            r"field 'links\.intra_node\.latency_seconds' must be a finite number",
        ),
        (
            "kernel_launch_seconds = 1e-5",
            "kernel_launch_seconds = -1e-5",
            r"field 'compute\.kernel_launch_seconds' must be a number >= 0",
        ),
        (
            "capacity_nbytes = 17179869184",
            "capacity_nbytes = 1.5",
            r"field 'memory\.capacity_nbytes' must be a positive whole number",
        ),
        (
            "float32 = 1e11, float64 = 5e10",
            "float32 = 1e11, float64 = -5e10",
            r"field 'compute\.peak_flops_per_s\.float64' must be a positive number",
        ),
        (
            "float32 = 1e11, float64 = 5e10",
            "float64 = 5e10",
            r"field 'compute\.peak_flops_per_s' must be a table with a 'float32' entry",
        ),
        (
            'device_type = "cpu"',
            'device_type = "tpu"',
            r"field 'device_type' must be 'cuda' or 'cpu' .*got str 'tpu'",
        ),
        (
            "bytes_per_s = 2e10",
            "bandwidth = 2e10",
            r"unknown field 'memory\.bandwidth'; expected one of "
            r".*units are part of each field name",
        ),
        ("[links.intra_node]", "[links.inter_node]", r"field 'links\.inter_node' needs version = 2"),
        ('name = "tiny"', "name = ", r"not valid TOML"),
        (
            "kernel_launch_seconds = 1e-5",
            "kernel_launch_seconds = 1e-5\nmatmul_weight_bytes_per_s = -8e9",
            r"field 'compute\.matmul_weight_bytes_per_s' must be a positive number",
        ),
        (
            "kernel_launch_seconds = 1e-5",
            "kernel_launch_seconds = 1e-5\nmatmul_weight_bytes_per_s = 8",
            r"field 'compute\.matmul_weight_bytes_per_s' must be between 1e\+08 and 1e\+14 bytes per second",
        ),
        (
            "kernel_launch_seconds = 1e-5",
            "kernel_launch_seconds = 1e-5\nmatmul_launch_seconds = 3",
            r"field 'compute\.matmul_launch_seconds' must be between 0 and 0\.1 seconds",
        ),
    ],
)
def test_malformed_profile_names_file_and_field(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    path = _write(tmp_path, _replace_line(VALID_TOML, old, new), name="broken.toml")
    with pytest.raises(ProfileError, match=re.escape(str(path)) + ": .*" + message):
        load_profile(path)


def test_matmul_fields_load_and_write_back(tmp_path: Path) -> None:
    text = _replace_line(VALID_TOML, "kernel_launch_seconds = 1e-5", "kernel_launch_seconds = 1e-5\nmatmul_launch_seconds = 3e-6\nmatmul_weight_bytes_per_s = 8e9")
    profile = load_profile(_write(tmp_path, text, name="weighty.toml"))
    assert (profile.matmul_launch_seconds, profile.matmul_weight_bytes_per_s) == (3e-6, 8e9)
    assert load_profile(_write(tmp_path, profile_to_toml(profile), name="again.toml")) == profile
    plain = load_profile(_write(tmp_path, VALID_TOML, name="plain.toml"))
    assert plain.matmul_launch_seconds is None and plain.matmul_weight_bytes_per_s is None
    assert "matmul" not in profile_to_toml(plain)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ProfileError, match=r"HardwareProfile: field 'memory_efficiency'"):
        dataclasses.replace(ROUND, memory_efficiency=0.0)
    with pytest.raises(ProfileError, match=r"LinkProfile: field 'bytes_per_s'"):
        LinkProfile(latency_seconds=0.0, bytes_per_s=0.0)
    with pytest.raises(ProfileError, match=r"'float32' entry"):
        dataclasses.replace(ROUND, peak_flops_per_s={"bfloat16": 1e12})
    with pytest.raises(ProfileError, match=r"HardwareProfile: field 'matmul_weight_bytes_per_s' must be a positive number"):
        dataclasses.replace(ROUND, matmul_weight_bytes_per_s=0.0)


def test_cost_models_imports_neither_torch_nor_autotp() -> None:
    code = (
        "import sys, cost_models; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'autotp')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------
# Algorithms: tree all-reduce, broadcast, auto, per-collective link numbers
# ------------------------------------------------------------------------------------------

# alpha = 1e-5 s, beta = 1e9 B/s, o = 2e-5 s: round numbers for hand computation.
LINK = LinkProfile(latency_seconds=1e-5, bytes_per_s=1e9, call_overhead_seconds=2e-5)


@pytest.mark.parametrize(
    ("n", "rounds"),
    [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4)],  # ⌈log2 n⌉
)
def test_tree_all_reduce_by_hand(n: int, rounds: int) -> None:
    # binomial reduce + binomial broadcast: 2L rounds, each carrying the whole B.
    assert latency_steps("all_reduce", group_size=n, algorithm="tree") == 2 * rounds
    assert bytes_moved_per_rank("all_reduce", nbytes=1e6, group_size=n, algorithm="tree") == pytest.approx(2 * rounds * 1e6)
    seconds = collective_seconds(LINK, "all_reduce", nbytes=1e6, group_size=n, algorithm="tree")
    assert seconds == pytest.approx(2e-5 + 2 * rounds * 1e-5 + 2 * rounds * 1e6 / 1e9)


def test_ring_all_reduce_moves_2_n_minus_1_over_n_bytes() -> None:
    # the classic: B bytes on n ranks, each rank sends 2(n-1)/n · B in 2(n-1) steps.
    for n in (2, 3, 4, 8, 16):
        assert bytes_moved_per_rank("all_reduce", nbytes=1e6, group_size=n, algorithm="ring") == pytest.approx(2 * (n - 1) / n * 1e6)
        seconds = collective_seconds(LINK, "all_reduce", nbytes=1e6, group_size=n)
        assert seconds == pytest.approx(2e-5 + 2 * (n - 1) * 1e-5 + 2 * (n - 1) / n * 1e6 / 1e9)


def test_broadcast_ring_and_tree_by_hand() -> None:
    # n = 8, B = 1e6. ring (pipelined chain): 7 steps, B once: 2e-5 + 7e-5 + 1e-3.
    assert collective_seconds(LINK, "broadcast", nbytes=1e6, group_size=8) == pytest.approx(2e-5 + 7e-5 + 1e-3)
    # binomial tree: 3 rounds of the whole B: 2e-5 + 3e-5 + 3e-3.
    assert collective_seconds(LINK, "broadcast", nbytes=1e6, group_size=8, algorithm="tree") == pytest.approx(2e-5 + 3e-5 + 3e-3)
    assert latency_steps(Collective.BROADCAST, group_size=8) == 7
    assert bytes_moved_per_rank("broadcast", nbytes=1e6, group_size=8, algorithm="tree") == pytest.approx(3e6)


def test_auto_takes_the_cheaper_algorithm_per_message() -> None:
    # n = 8: ring 14 steps + 1.75·B/beta, tree 6 steps + 6·B/beta. Equal when
    # 8·alpha = 4.25·B/beta, i.e. B = 8e-5 · 1e9 / 4.25 = 18823.5 bytes.
    small, large = 1e3, 1e6
    for nbytes, winner in ((small, "tree"), (large, "ring")):
        auto = collective_seconds(LINK, "all_reduce", nbytes=nbytes, group_size=8, algorithm="auto")
        best = collective_seconds(LINK, "all_reduce", nbytes=nbytes, group_size=8, algorithm=winner)
        assert auto == pytest.approx(best)
        link = dataclasses.replace(LINK, algorithms={"all_reduce": "auto"})
        assert select_algorithm(link, "all_reduce", nbytes=nbytes, group_size=8).value == winner
        assert collective_seconds(link, "all_reduce", nbytes=nbytes, group_size=8) == pytest.approx(best)
    lines = collective_terms(LINK, "all_reduce", group_size=8, algorithm="auto")
    ring, tree = lines
    crossing = (tree.fixed_seconds - ring.fixed_seconds) / (ring.seconds_per_byte - tree.seconds_per_byte)
    assert crossing == pytest.approx(8e-5 * 1e9 / 4.25)


def test_collective_terms_are_the_lines_collective_seconds_takes_the_minimum_of() -> None:
    for kind in Collective:
        for n in (2, 4, 8):
            (line,) = collective_terms(LINK, kind, group_size=n)
            assert line.seconds(3e6) == pytest.approx(collective_seconds(LINK, kind, nbytes=3e6, group_size=n))
            assert line.seconds(0) == 0.0
    assert collective_terms(LINK, "all_reduce", group_size=1) == ()


def test_per_collective_link_numbers_override_the_links() -> None:
    link = dataclasses.replace(LINK, collectives={"broadcast": CollectiveLink(bytes_per_s=4e9, call_overhead_seconds=0.0)})
    assert link.alpha_beta("broadcast") == (0.0, 1e-5, 4e9)
    assert link.alpha_beta("all_reduce") == (2e-5, 1e-5, 1e9)
    # n = 2 broadcast of 4e6 bytes: 0 + 1 · 1e-5 + 4e6 / 4e9.
    assert collective_seconds(link, "broadcast", nbytes=4e6, group_size=2) == pytest.approx(1e-5 + 1e-3)


@pytest.mark.parametrize(("kind", "algorithm"), [("all_gather", "tree"), ("all_to_all", "ring"), ("all_reduce", "butterfly")])
def test_algorithm_a_collective_does_not_have_is_rejected(kind: str, algorithm: str) -> None:
    with pytest.raises(ValueError, match=rf"{kind} has no algorithm '{algorithm}'; expected one of"):
        collective_seconds(LINK, kind, nbytes=1.0, group_size=4, algorithm=algorithm)


def test_link_rejects_unknown_collective_or_algorithm() -> None:
    with pytest.raises(ProfileError, match=r"LinkProfile: field 'algorithms.gather'"):
        dataclasses.replace(LINK, algorithms={"gather": "ring"})
    with pytest.raises(ProfileError, match=r"field 'algorithms.all_gather'.*no algorithm 'tree'"):
        dataclasses.replace(LINK, algorithms={"all_gather": "tree"})
    with pytest.raises(ProfileError, match=r"CollectiveLink: field 'bytes_per_s' must be a positive number"):
        CollectiveLink(bytes_per_s=-1.0)


# ------------------------------------------------------------------------------------------
# Links per group and per mesh axis
# ------------------------------------------------------------------------------------------

TWO_NODES = dataclasses.replace(
    ROUND, inter_node=LinkProfile(latency_seconds=1e-4, bytes_per_s=1e8), devices_per_node=8
)


def test_groups_within_a_node_use_the_intra_node_link() -> None:
    assert TWO_NODES.link_for_group(8) is TWO_NODES.intra_node
    assert TWO_NODES.link_for_group(16) is TWO_NODES.inter_node
    assert TWO_NODES.link_for_group(2, stride=8) is TWO_NODES.inter_node  # one device per node
    # a (2, 8) mesh: the inner axis stays in a node, the outer one crosses nodes
    assert TWO_NODES.link_for_axis((2, 8), 1) is TWO_NODES.intra_node
    assert TWO_NODES.link_for_axis((2, 8), 0) is TWO_NODES.inter_node
    assert TWO_NODES.link_for_axis((4, 2), -1) is TWO_NODES.intra_node
    # a one-node profile prices every group on its one link
    assert ROUND.link_for_group(64) is ROUND.intra_node


def test_inter_node_link_needs_devices_per_node() -> None:
    with pytest.raises(ProfileError, match="inter_node and devices_per_node go together"):
        dataclasses.replace(ROUND, inter_node=ROUND.intra_node)
    with pytest.raises(ProfileError, match="devices_per_node' must be a positive"):
        dataclasses.replace(TWO_NODES, devices_per_node=0)


def test_cost_model_prices_a_group_that_spans_nodes_on_the_inter_node_link() -> None:
    import torch

    from autotp.cost.model import CostModel
    from autotp.ir.placement import P, R
    from autotp.ir.values import TensorMeta

    meta = TensorMeta((1000, 1000), torch.float32)  # 4e6 bytes
    for tp, link in ((8, TWO_NODES.intra_node), (16, TWO_NODES.inter_node)):
        cost = CostModel(TWO_NODES, tp)
        expected = collective_seconds(link, "all_reduce", nbytes=4e6, group_size=tp)
        assert cost.transition_seconds((P,), (R,), meta) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------
# Roofline as three numbers; activation liveness
# ------------------------------------------------------------------------------------------


def test_roofline_numbers_give_roofline_seconds() -> None:
    rates = roofline(ROUND, "bfloat16")
    assert rates == Roofline(launch_seconds=1e-5, seconds_per_flop=1 / 2e12, seconds_per_byte=1 / 5e10)
    for flops, nbytes in ((2e9, 1e7), (1e6, 1e8), (0, 0)):
        assert rates.seconds(flops, nbytes) == pytest.approx(roofline_seconds(ROUND, flops=flops, nbytes=nbytes, dtype="bfloat16"))


def test_peak_live_nbytes_by_hand() -> None:
    # x (4 B) read at step 1, y (8 B) made at 1 and read at 2, z (2 B) made at 2:
    # step 0: 4, step 1: 4 + 8 = 12, step 2: 8 + 2 = 10.
    assert peak_live_nbytes([(0, 1, 4), (1, 2, 8), (2, 2, 2)]) == 12
    # a value kept to the end stacks with everything after it
    assert peak_live_nbytes([(0, 3, 4), (1, 1, 8), (2, 2, 8), (3, 3, 1)]) == 12
    assert peak_live_nbytes([]) == 0
    with pytest.raises(ValueError, match="cannot die"):
        peak_live_nbytes([(3, 1, 1.0)])
