"""autotp: automatic tensor parallelism for unmodified PyTorch models.

    plan = autotp.plan(model, example_inputs, mesh_shape=(4,), hardware="h100-sxm")
    sharded = autotp.parallelize(model, mesh, example_inputs)
"""
from autotp.api import parallelize, plan
from autotp.errors import AutoTPError, CaptureError, ConfigError, InfeasiblePlanError, PlanMismatchError, SolverError
from autotp.placement import Partial, Replicate, Shard
from autotp.plan import Plan
from autotp.strategies import UnsupportedOpWarning

__all__ = [
    "AutoTPError", "CaptureError", "ConfigError", "InfeasiblePlanError", "Partial", "Plan",
    "PlanMismatchError", "Replicate", "Shard", "SolverError", "UnsupportedOpWarning",
    "parallelize", "plan",
]
