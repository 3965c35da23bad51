"""Rank functions of tests/test_overlap_cost.py."""
from __future__ import annotations

import torch

from autotp.cost.calibrate import CalibrationConfig, RankMeasurements, measure_overlap


def measure(rank: int, world_size: int, config: CalibrationConfig) -> RankMeasurements:
    """The overlap probe alone on this rank."""
    return RankMeasurements(kernels=[], collectives=[], overlap=measure_overlap(world_size, config, torch.device("cpu")))
