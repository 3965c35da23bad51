"""Cost models for autotp: how long compute and collectives take, in seconds.

This package never imports torch or autotp; it speaks bytes, FLOPs, group sizes and seconds:

* :mod:`cost_models.profile`: validated, frozen hardware profiles.
* :mod:`cost_models.profile_files`: the TOML schema; loading by name or path, and writing.
* :mod:`cost_models.compute`: roofline time of one kernel.
* :mod:`cost_models.comm`: alpha-beta time of collectives, per algorithm (ring, tree, pairwise).
* :mod:`cost_models.overlap`: what a collective costs with compute beside it.
* :mod:`cost_models.memory`: bytes of parameters, gradients, optimizer state; peak live bytes.
* :mod:`cost_models.calibrate`: fitting profile numbers to measurements (``autotp calibrate``).
"""

from __future__ import annotations

from cost_models.algorithms import ALGORITHMS, Algorithm, Collective
from cost_models.comm import (
    PiecewiseLinearCost,
    bytes_moved_per_rank,
    collective_seconds,
    collective_terms,
    latency_steps,
    select_algorithm,
    transfer_seconds,
    wake_seconds,
)
from cost_models.compute import Roofline, matmul_roofline, matmul_seconds, op_seconds, roofline, roofline_seconds
from cost_models.memory import OPTIMIZER_STATE_BYTES_PER_ELEMENT, peak_live_nbytes, state_nbytes
from cost_models.overlap import exposed_seconds, hidden_seconds, slowdown_from_timings
from cost_models.profile import OP_CLASSES, BandwidthKnee, CollectiveLink, HardwareProfile, LinkProfile, OpClassRate, ProfileError, WakeCurve
from cost_models.profile_files import (
    SCHEMA_VERSION,
    available_profiles,
    load_profile,
    profile_from_dict,
    profile_to_toml,
    user_profile_dirs,
    user_profiles,
    write_profile,
)

__all__ = [
    "ALGORITHMS",
    "OP_CLASSES",
    "OPTIMIZER_STATE_BYTES_PER_ELEMENT",
    "SCHEMA_VERSION",
    "Algorithm",
    "BandwidthKnee",
    "Collective",
    "CollectiveLink",
    "HardwareProfile",
    "LinkProfile",
    "OpClassRate",
    "PiecewiseLinearCost",
    "ProfileError",
    "Roofline",
    "WakeCurve",
    "available_profiles",
    "bytes_moved_per_rank",
    "collective_seconds",
    "collective_terms",
    "exposed_seconds",
    "hidden_seconds",
    "latency_steps",
    "load_profile",
    "matmul_roofline",
    "matmul_seconds",
    "op_seconds",
    "peak_live_nbytes",
    "profile_from_dict",
    "profile_to_toml",
    "roofline",
    "roofline_seconds",
    "select_algorithm",
    "slowdown_from_timings",
    "state_nbytes",
    "transfer_seconds",
    "user_profile_dirs",
    "user_profiles",
    "wake_seconds",
    "write_profile",
]
