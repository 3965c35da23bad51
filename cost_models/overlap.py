"""What a collective costs when compute runs beside it (``autotp.comm.overlap`` decides what does).

Compute of ``C`` seconds runs while a collective of ``T`` seconds communicates. Communication
does not slow (it is bound by the link), but compute shares the device with it (NCCL kernels
hold SMs and memory bandwidth; gloo's threads share the CPU's cores), so while both run compute
proceeds at rate ``1 / (1 + slowdown)`` (``HardwareProfile.overlap_slowdown``, measured by
``autotp calibrate``).
"""
from __future__ import annotations

import math


def exposed_seconds(comm_seconds: float, compute_seconds: float, *, slowdown: float) -> float:
    """Seconds a step pays beyond ``compute_seconds`` for a collective of ``comm_seconds`` beside it.

    Let ``T = comm_seconds``, ``C = compute_seconds``, ``s = slowdown``, and both start together.
    In ``T`` seconds the slowed compute does ``T / (1 + s)`` seconds of its own work.

    * ``C ≥ T / (1 + s)``: the collective ends first; the rest of compute runs at full speed, so
      the pair takes ``T + (C - T / (1 + s))`` and exposes ``T·s / (1 + s)`` (the work lost to
      the slowdown).
    * ``C < T / (1 + s)``: compute ends first, slowed to ``C·(1 + s) ≤ T``; the pair takes ``T``
      and exposes ``T - C``.

    Together: ``exposed = max(T - C, T·s / (1 + s))`` and ``hidden = T - exposed =
    min(C, T / (1 + s))``. With ``s = 0`` it is ``max(T - C, 0)``; as ``s`` grows nothing hides.
    E.g. ``T = 10``, ``C = 20``, ``s = 0.25``: exposed ``2``, hidden ``8``.
    """
    if comm_seconds < 0 or compute_seconds < 0 or not math.isfinite(slowdown) or slowdown < 0:
        raise ValueError(f"exposed_seconds needs seconds >= 0 and a finite slowdown >= 0, got {comm_seconds}, {compute_seconds}, {slowdown}")
    return comm_seconds - hidden_seconds(comm_seconds, compute_seconds, slowdown=slowdown)


def hidden_seconds(comm_seconds: float, compute_seconds: float, *, slowdown: float) -> float:
    """The part of a collective of ``comm_seconds`` hidden behind ``compute_seconds`` beside it:
    ``min(C, T / (1 + s))`` (:func:`exposed_seconds` derives it)."""
    return min(compute_seconds, comm_seconds / (1.0 + slowdown))


def slowdown_from_timings(*, compute_seconds: float, comm_seconds: float, overlapped_seconds: float, max_ratio: float = 0.95) -> float:
    """The compute slowdown a measurement implies: compute ``C`` alone, the collective ``T`` alone,
    both started together ``O`` (with ``C ≳ T``, so the collective ends first).

    From :func:`exposed_seconds`, ``O = C + T·s / (1 + s)``, so ``r = (O - C) / T = s / (1 + s)``
    and ``s = r / (1 - r)``; ``r`` is clipped to ``[0, max_ratio]`` (noise can put ``O`` below
    ``C``, and ``r → 1`` means nothing hides: ``s`` would be unbounded).
    """
    if comm_seconds <= 0:
        raise ValueError(f"slowdown_from_timings needs a collective time > 0, got {comm_seconds}")
    ratio = min(max((overlapped_seconds - compute_seconds) / comm_seconds, 0.0), max_ratio)
    return ratio / (1.0 - ratio)
