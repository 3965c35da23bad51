"""``autotp calibrate``: the fits on synthetic timings, a measured run on 2 gloo ranks, the CLI."""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cost_models import collective_seconds, latency_steps, load_profile, roofline_seconds, write_profile
from cost_models.calibrate import (
    CalibrationError,
    CollectiveSample,
    KernelSample,
    build_profile,
    fit_all,
    fit_collective,
    fit_collective_algorithm,
    fit_compute,
)
from cost_models.profile import HardwareProfile, LinkProfile

KIB, MIB = 2**10, 2**20
# launch 1e-5 s; achieved 5e10 B/s, 5e11 fp32 and 2e12 bf16 FLOP/s
ROUND = HardwareProfile(
    name="round", device_type="cpu", peak_flops_per_s={"float32": 1e12, "bfloat16": 4e12},
    memory_bytes_per_s=1e11, memory_capacity_nbytes=2**30, compute_efficiency=0.5, memory_efficiency=0.5,
    kernel_launch_seconds=1e-5, intra_node=LinkProfile(latency_seconds=1e-5, bytes_per_s=1e9), source="test fixture",
)
SIZES = [4 * KIB * 4**k for k in range(8)]  # 4 KiB .. 64 MiB


def _samples(kind: str, link: LinkProfile, groups: tuple[int, ...]) -> list[CollectiveSample]:
    return [CollectiveSample(kind, n, float(b), collective_seconds(link, kind, nbytes=b, group_size=n)) for n in groups for b in SIZES]


@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"])
def test_collective_fit_recovers_o_alpha_beta(kind: str) -> None:
    link = LinkProfile(latency_seconds=3e-5, bytes_per_s=2e9, call_overhead_seconds=1e-4)
    fit = fit_collective(_samples(kind, link, (2, 4, 8)))
    assert fit.call_overhead_seconds == pytest.approx(1e-4, rel=1e-6)
    assert fit.latency_seconds == pytest.approx(3e-5, rel=1e-6)
    assert fit.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0) and fit.median_rel_error < 1e-9 and fit.median_rel_error_large < 1e-9


@pytest.mark.parametrize(("kind", "algorithm"), [("broadcast", "tree"), ("broadcast", "ring"), ("all_reduce", "tree"), ("all_reduce", "ring")])
def test_the_fit_tells_ring_from_tree_by_the_group_sizes(kind: str, algorithm: str) -> None:
    """Timings made by one algorithm on groups of 2 and 4 are fitted best by that algorithm."""
    link = LinkProfile(latency_seconds=3e-5, bytes_per_s=2e9, call_overhead_seconds=1e-4, algorithms={kind: algorithm})
    samples = _samples(kind, link, (2, 4))
    fit = fit_collective_algorithm(samples)
    assert fit.algorithm == (None if algorithm == "ring" else algorithm)  # None: the default, ring
    assert fit.bytes_per_s == pytest.approx(2e9, rel=1e-6) and fit.median_rel_error < 1e-9
    profile = build_profile(fit_all(_kernels(), _samples("all_reduce", link, (2, 4)) + samples), name="p", device_type="cpu", memory_capacity_nbytes=2**30, description="t")
    assert dict(profile.intra_node.algorithms) == ({} if algorithm == "ring" else {kind: algorithm})
    for n, b in ((2, 3 * MIB), (4, 3 * MIB)):  # the profile prices as the timings were made
        assert collective_seconds(profile.intra_node, kind, nbytes=b, group_size=n) == pytest.approx(collective_seconds(link, kind, nbytes=b, group_size=n), rel=1e-6)


def test_one_group_size_keeps_the_default_algorithm() -> None:
    link = LinkProfile(latency_seconds=3e-5, bytes_per_s=2e9, call_overhead_seconds=1e-4, algorithms={"broadcast": "tree"})
    assert fit_collective_algorithm(_samples("broadcast", link, (4,))).algorithm is None


def _kernels() -> list[KernelSample]:
    kernels = [KernelSample("memory", "float32", n / 12, float(n), roofline_seconds(ROUND, flops=n / 12, nbytes=n)) for n in SIZES]
    return kernels + [KernelSample("matmul", "float32", 2.0 * m**3, 12.0 * m * m, roofline_seconds(ROUND, flops=2.0 * m**3, nbytes=12.0 * m * m)) for m in (64, 256, 1024)]


def test_one_group_size_puts_the_fixed_cost_in_o() -> None:
    # with n = 4 only, o + 6·alpha is all that the timings determine
    link = LinkProfile(latency_seconds=3e-5, bytes_per_s=2e9, call_overhead_seconds=1e-4)
    fit = fit_collective(_samples("all_reduce", link, (4,)))
    assert fit.latency_seconds == 0.0
    assert fit.call_overhead_seconds == pytest.approx(1e-4 + 6 * 3e-5, rel=1e-6)
    assert fit.fixed_seconds(4) == pytest.approx(1e-4 + latency_steps("all_reduce", group_size=4) * 3e-5, rel=1e-6)


def test_fit_minimises_relative_error() -> None:
    # one 4 KiB sample 10x too slow: the fit is pulled toward it no more than any other sample
    link = LinkProfile(latency_seconds=0.0, bytes_per_s=1e9, call_overhead_seconds=1e-4)
    samples = _samples("all_gather", link, (2,))
    samples[0] = CollectiveSample("all_gather", 2, samples[0].nbytes, samples[0].seconds * 10)
    fit = fit_collective(samples)
    assert fit.median_rel_error < 0.2 and 0.5e9 < fit.bytes_per_s < 2e9


def test_times_that_do_not_grow_cannot_be_fitted() -> None:
    flat = [CollectiveSample("all_reduce", 2, float(b), 1e-3) for b in SIZES]
    with pytest.raises(CalibrationError, match="do not grow with the message size"):
        fit_collective(flat)
    with pytest.raises(CalibrationError, match="need at least 2"):
        fit_collective(flat[:1])


def test_compute_fit_recovers_launch_bandwidth_and_flops() -> None:
    samples = [KernelSample("memory", "float32", n / 12, float(n), roofline_seconds(ROUND, flops=n / 12, nbytes=n)) for n in SIZES]
    for dtype in ("float32", "bfloat16"):
        for m in (32, 128, 512, 1024):
            flops, nbytes = 2.0 * m**3, 3.0 * m * m * 4
            samples.append(KernelSample("matmul", dtype, flops, nbytes, roofline_seconds(ROUND, flops=flops, nbytes=nbytes, dtype=dtype)))
    fit = fit_compute(samples)
    assert fit.kernel_launch_seconds == pytest.approx(1e-5, rel=1e-6)
    assert fit.memory_bytes_per_s == pytest.approx(5e10, rel=1e-6)
    assert fit.flops_per_s["float32"] == pytest.approx(5e11, rel=1e-4)
    assert fit.flops_per_s["bfloat16"] == pytest.approx(2e12, rel=1e-4)


def _synthetic_report():
    link = LinkProfile(latency_seconds=0.0, bytes_per_s=1e9, call_overhead_seconds=1e-4)
    fast = LinkProfile(latency_seconds=0.0, bytes_per_s=4e9, call_overhead_seconds=5e-5)
    collectives = _samples("all_reduce", link, (2,)) + _samples("broadcast", fast, (2,))
    kernels = [KernelSample("memory", "float32", n / 12, float(n), roofline_seconds(ROUND, flops=n / 12, nbytes=n)) for n in SIZES]
    kernels += [KernelSample("matmul", "float32", 2.0 * m**3, 12.0 * m * m, roofline_seconds(ROUND, flops=2.0 * m**3, nbytes=12.0 * m * m)) for m in (64, 256, 1024)]
    return fit_all(kernels, collectives)


def test_built_profile_holds_each_collectives_numbers_and_says_they_were_measured(tmp_path: Path) -> None:
    report = _synthetic_report()
    profile = build_profile(report, name="box", device_type="cpu", memory_capacity_nbytes=2**34, description="box, 2 ranks")
    assert profile.intra_node.bytes_per_s == pytest.approx(1e9) and profile.compute_efficiency == 1.0
    assert profile.intra_node.alpha_beta("broadcast") == pytest.approx((5e-5, 0.0, 4e9))
    assert all(text.startswith(("measured", "1.0")) for text in profile.sources.values())
    path = write_profile(profile, tmp_path / "box.toml", header=report.text())
    assert load_profile(path) == profile
    text = report.text()
    assert re.search(r"all_reduce\s+2\s+100\.0us\s+1\.000GB/s\s+1\.000\s+0\.0%\s+0\.0%", text), text
    assert "broadcast" in text and "matmul float32" in text


def test_all_reduce_is_required() -> None:
    with pytest.raises(CalibrationError, match="all_reduce was not measured"):
        fit_all([], [CollectiveSample("broadcast", 2, float(b), 1e-4 + b / 1e9) for b in SIZES])


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_message_grid_steps_x4_to_1_mib_then_x2_and_x4_when_quick(device_type: str) -> None:
    """Knees can only sit at measured sizes: the full grid doubles from 1 MiB to 256 MiB."""
    from autotp.cost.calibrate import KIB, MIB, default_config

    full = default_config(device_type=device_type, quick=False).message_nbytes
    quick = default_config(device_type=device_type, quick=True).message_nbytes
    assert full == (4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB, 2 * MIB, 4 * MIB, 8 * MIB, 16 * MIB, 32 * MIB, 64 * MIB, 128 * MIB, 256 * MIB)
    assert quick == (4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB)


# ---------------------------------------------------------------------------------------------
# Measured on this machine


@pytest.mark.timeout(240)
def test_measured_profile_on_two_ranks_plans_a_model() -> None:
    """A reduced grid measured on 2 gloo ranks fits into a profile the planner accepts."""
    import autotp
    from autotp.cost.calibrate import CalibrationConfig, measure_rank, merge
    from autotp.examples import build_example
    from autotp.testing import run_on_ranks

    config = CalibrationConfig(
        device_type="cpu", matmul_shapes=((32, 32, 32), (128, 128, 128)), dtypes=("float32",),
        memory_nbytes=(16 * KIB, 256 * KIB, MIB), message_nbytes=(16 * KIB, MIB, 8 * MIB),  # sizes far apart: a loaded CI box is noisy
        collectives=("all_reduce", "all_gather"), repeats=2, warmup=1,
    )
    ranks = run_on_ranks(measure_rank, 2, config, timeout_seconds=180)
    report = fit_all(*merge(ranks))
    profile = build_profile(report, name="measured", device_type="cpu", memory_capacity_nbytes=2**33, description="test")
    assert 1e6 < profile.intra_node.bytes_per_s < 1e12 and 1e8 < profile.flops_per_s("float32") < 1e13
    model, inputs = build_example("mlp", device="meta")
    plan = autotp.plan(model, inputs, mesh_shape=(2,), hardware=profile, training=False)
    assert plan.hardware == "measured" and plan.total_seconds > 0


@pytest.mark.timeout(300)
def test_cli_quick_calibration_writes_a_profile_usable_by_name_and_path(tmp_path: Path) -> None:
    exe = shutil.which("autotp")
    assert exe, "the autotp console script is not installed (pip install -e .)"
    env = {**__import__("os").environ, "AUTOTP_PROFILE_DIR": str(tmp_path)}
    started = time.perf_counter()
    done = subprocess.run([exe, "calibrate", "--nproc", "2", "--quick", "--name", "ci-box"], capture_output=True, text=True, timeout=240, env=env)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert elapsed < 120, f"autotp calibrate --quick took {elapsed:.0f}s"
    assert re.search(r"all_reduce\s+2\s+[0-9.]+us\s+[0-9.]+GB/s", done.stdout), done.stdout
    assert "round 1/" in done.stderr  # progress
    path = tmp_path / "ci-box.toml"
    assert f"wrote {path}" in done.stdout and 'hardware="ci-box"' in done.stdout
    profile = load_profile(path)
    assert profile.name == "ci-box" and profile.device_type == "cpu"
    import autotp
    from autotp.examples import build_example

    model, inputs = build_example("mlp", device="meta")
    assert autotp.plan(model, inputs, mesh_shape=(2,), hardware=str(path), training=False).hardware == "ci-box"


def test_cli_refuses_a_built_in_name(tmp_path: Path) -> None:
    done = subprocess.run([shutil.which("autotp") or "autotp", "calibrate", "--name", "h100-sxm"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is a built-in profile name" in done.stderr


def test_matmul_fit_recovers_launch_flops_and_weight_fetch_and_the_profile_prices_with_them(tmp_path: Path) -> None:
    """Timings made by ``matmul_seconds`` on a profile with a matmul launch and a weight rate are
    fitted back to those numbers, and the built profile prices a matmul as they were made."""
    from cost_models import matmul_seconds

    truth = dataclasses.replace(ROUND, matmul_launch_seconds=3e-6, matmul_weight_bytes_per_s=8e9)
    samples = [KernelSample("memory", "float32", n / 12, float(n), roofline_seconds(ROUND, flops=n / 12, nbytes=n)) for n in SIZES]
    for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
        for m, k, n in ((64, 64, 64), (256, 256, 256), (1024, 256, 256), (128, 1024, 512), (512, 512, 512)):
            flops, nbytes, weight = 2.0 * m * k * n, float((m * k + k * n + m * n) * itemsize), float(k * n * itemsize)
            seconds = matmul_seconds(truth, flops=flops, nbytes=nbytes, weight_nbytes=weight, dtype=dtype)
            samples.append(KernelSample("matmul", dtype, flops, nbytes, seconds, weight_nbytes=weight))
    fit = fit_compute(samples)
    assert fit.matmul_launch_seconds == pytest.approx(3e-6, rel=1e-4)
    assert fit.matmul_weight_bytes_per_s == pytest.approx(8e9, rel=1e-4)
    assert fit.flops_per_s == pytest.approx({"float32": 5e11, "bfloat16": 2e12}, rel=1e-4)
    report = fit_all(samples, _samples("all_reduce", LinkProfile(latency_seconds=0.0, bytes_per_s=1e9, call_overhead_seconds=1e-4), (2,)))
    assert re.search(r"matmul weight fetch\s+8\.00 GB/s", report.text()) and re.search(r"matmul launch\s+3\.00 us", report.text())
    profile = build_profile(report, name="box", device_type="cpu", memory_capacity_nbytes=2**34, description="box")
    assert "least squares" in profile.sources["compute.matmul_weight_bytes_per_s"]
    loaded = load_profile(write_profile(profile, tmp_path / "box.toml"))
    for m, k, n in ((128, 128, 128), (256, 128, 352)):  # shapes the grid did not hold
        flops, nbytes, weight = 2.0 * m * k * n, float((m * k + k * n + m * n) * 4), float(k * n * 4)
        assert matmul_seconds(loaded, flops=flops, nbytes=nbytes, weight_nbytes=weight) == pytest.approx(
            matmul_seconds(truth, flops=flops, nbytes=nbytes, weight_nbytes=weight), rel=1e-3)


def test_matmuls_that_do_not_say_their_weight_fit_without_a_weight_fetch() -> None:
    fit = fit_compute(_kernels())
    assert fit.matmul_weight_bytes_per_s is None
    assert fit.flops_per_s["float32"] == pytest.approx(5e11, rel=1e-4)
