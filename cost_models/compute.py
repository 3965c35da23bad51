"""Roofline time of one kernel on one device.

A kernel that does F floating-point operations and moves N bytes to and from device memory
cannot finish faster than either resource allows, and on a GPU the two overlap, so

    T = t_launch + max( F / (P[dtype] * e_c),  N / (W * e_m) )

with P the datasheet peak FLOP/s for the dtype, W the peak memory bandwidth, and e_c, e_m the
achievable fractions of each (``HardwareProfile.compute_efficiency``/``memory_efficiency``).
The kernel is compute-bound when its arithmetic intensity F/N exceeds the ridge point
P·e_c / (W·e_m), memory-bound below it. t_launch is the fixed floor every kernel pays.
A matmul on a CPU also pays for fetching its weight, which the arithmetic of a small matmul
does not hide, when a calibrated profile says so: :func:`matmul_seconds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cost_models.profile import HardwareProfile

__all__ = ["Roofline", "matmul_roofline", "matmul_seconds", "op_seconds", "roofline", "roofline_seconds"]


@dataclass(frozen=True, slots=True)
class Roofline:
    """The roofline of one dtype on one device as three numbers:

        T(F, N) = launch_seconds + max(F · seconds_per_flop, N · seconds_per_byte)

    (0 when F = N = 0). Symbolic callers build the same expression from these numbers.
    """

    launch_seconds: float
    seconds_per_flop: float
    seconds_per_byte: float

    def seconds(self, flops: float, nbytes: float) -> float:
        if flops == 0 and nbytes == 0:
            return 0.0
        return self.launch_seconds + max(flops * self.seconds_per_flop, nbytes * self.seconds_per_byte)


def roofline(profile: HardwareProfile, dtype: str = "float32") -> Roofline:
    """``profile``'s roofline for ``dtype``: achieved rates are peak times efficiency."""
    return Roofline(
        launch_seconds=profile.kernel_launch_seconds,
        seconds_per_flop=1.0 / (profile.flops_per_s(dtype) * profile.compute_efficiency),
        seconds_per_byte=1.0 / (profile.memory_bytes_per_s * profile.memory_efficiency),
    )


def matmul_roofline(profile: HardwareProfile, dtype: str = "float32") -> Roofline:
    """:func:`roofline` for a matmul: from ``matmul_launch_seconds`` when the profile has one."""
    rates = roofline(profile, dtype)
    launch = profile.matmul_launch_seconds
    return rates if launch is None else Roofline(launch, rates.seconds_per_flop, rates.seconds_per_byte)


def _work(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def roofline_seconds(
    profile: HardwareProfile, *, flops: float, nbytes: float, dtype: str = "float32"
) -> float:
    """Seconds for one kernel doing ``flops`` FLOPs and moving ``nbytes`` bytes of memory.

        T = kernel_launch_seconds + max(flops / (peak[dtype] * compute_efficiency),
                                        nbytes / (memory_bytes_per_s * memory_efficiency))

    Zero FLOPs and zero bytes means no kernel runs (a view, a reshape of metadata) and costs
    0.0, not the launch floor.

    Worked example on ``h100-sxm`` (peak bf16 9.895e14 FLOP/s, fp32 6.7e13, 3.35e12 B/s,
    efficiencies 0.7 and 0.8, launch 5e-6 s):

    * bf16 matmul (4096, 4096) @ (4096, 4096): flops = 2·4096³ = 1.37e11, nbytes = 3·4096²·2
      = 1.01e8. Compute 1.37e11 / 6.93e14 = 198 µs beats memory 1.01e8 / 2.68e12 = 38 µs, so
      it is compute-bound: T ≈ 5 µs + 198 µs.
    * fp32 add of 2²⁴ elements: flops = 1.68e7, nbytes = 3·4·2²⁴ = 2.01e8. Memory 75 µs
      dwarfs compute 0.36 µs: memory-bound, T ≈ 5 µs + 75 µs.
    """
    flops = _work(flops, "flops")
    nbytes = _work(nbytes, "nbytes")
    if flops == 0.0 and nbytes == 0.0:
        return 0.0
    compute_seconds = flops / (profile.flops_per_s(dtype) * profile.compute_efficiency)
    memory_seconds = nbytes / (profile.memory_bytes_per_s * profile.memory_efficiency)
    return profile.kernel_launch_seconds + max(compute_seconds, memory_seconds)


def op_seconds(
    profile: HardwareProfile, *, flops: float, nbytes: float, dtype: str = "float32", op_class: str | None = None
) -> float:
    """Seconds for one op: its roofline, floored by the profile's measured rate for ``op_class``.

        T = max(roofline_seconds(flops, nbytes), launch[op_class] + flops · seconds_per_flop[op_class])

    The floor applies only when the profile lists ``op_class`` (a calibrated profile does); a
    view (no FLOPs, no bytes) then costs its class's launch, the framework's dispatch.
    """
    roof = roofline_seconds(profile, flops=flops, nbytes=nbytes, dtype=dtype)
    rate = profile.op_classes.get(op_class) if op_class is not None else None
    return roof if rate is None else max(roof, rate.seconds(_work(flops, "flops")))


def matmul_seconds(
    profile: HardwareProfile, *, flops: float, nbytes: float, weight_nbytes: float = 0.0, dtype: str = "float32"
) -> float:
    """Seconds for one matmul: its roofline from the matmul launch, plus fetching its weight when
    the profile says that does not overlap the compute:

        T = matmul_launch_seconds + max(flops / (peak[dtype] * compute_efficiency),
                                        nbytes / (memory_bytes_per_s * memory_efficiency))
            + weight_nbytes / matmul_weight_bytes_per_s

    (``kernel_launch_seconds`` without a matmul launch, no last term without a weight rate).
    E.g. 90 GFLOP/s, 8 GB/s for the weight, 3 us launch: a 256x128x128 fp32 matmul (8.39e6
    FLOPs, a 65536-byte weight) takes 3 + 93.2 + 8.2 = 104.4 us; with half the tokens,
    3 + 46.6 + 8.2 = 57.8 us, not half.
    """
    seconds = matmul_roofline(profile, dtype).seconds(_work(flops, "flops"), _work(nbytes, "nbytes"))
    rate = profile.matmul_weight_bytes_per_s
    return seconds if rate is None else seconds + _work(weight_nbytes, "weight_nbytes") / rate
