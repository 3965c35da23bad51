"""Cost models for autotp: how long compute and collectives take, in seconds.

This package never imports torch or autotp; it speaks bytes, FLOPs, group sizes and seconds:

* :mod:`cost_models.profile`: validated, frozen hardware profiles loaded from TOML.
* :mod:`cost_models.compute`: roofline time of one kernel.
* :mod:`cost_models.comm`: alpha-beta time of ring collectives.
* :mod:`cost_models.memory`: bytes of parameters, gradients and optimizer state.
"""

from __future__ import annotations

from cost_models.comm import Collective, bytes_moved_per_rank, collective_seconds, latency_steps
from cost_models.compute import roofline_seconds
from cost_models.memory import OPTIMIZER_STATE_BYTES_PER_ELEMENT, state_nbytes
from cost_models.profile import (
    SCHEMA_VERSION,
    HardwareProfile,
    LinkProfile,
    ProfileError,
    available_profiles,
    load_profile,
    profile_from_dict,
)

__all__ = [
    "OPTIMIZER_STATE_BYTES_PER_ELEMENT",
    "SCHEMA_VERSION",
    "Collective",
    "HardwareProfile",
    "LinkProfile",
    "ProfileError",
    "available_profiles",
    "bytes_moved_per_rank",
    "collective_seconds",
    "latency_steps",
    "load_profile",
    "profile_from_dict",
    "roofline_seconds",
    "state_nbytes",
]
