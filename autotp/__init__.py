"""autotp: automatic tensor parallelism for unmodified PyTorch models.

    plan = autotp.plan(model, example_inputs, mesh_shape=(4,), hardware="h100-sxm")
    sharded = autotp.parallelize(model, mesh, example_inputs)
"""
from autotp.api import parallelize, plan
from autotp.errors import (
    AutoTPError,
    CaptureError,
    CheckpointError,
    ConfigError,
    InfeasiblePlanError,
    InputMismatchError,
    PeerRankError,
    PlanFormatError,
    PlanMismatchError,
    SetupTimeoutError,
    SolverError,
    TargetError,
    TorchTPExportError,
)
from autotp.ir.placement import Partial, Replicate, Shard
from autotp.ir.plan import Plan
from autotp.report.crossover import Crossover, CrossoverReport, crossovers
from autotp.rewrite.random import manual_seed
from autotp.runtime.checkpoint import full_state_dict, load_full_checkpoint, load_sharded_state_dict, save_pretrained, sharded_state_dict
from autotp.runtime.verify import VerifyReport, verify
from autotp.strategies.engine import UnsupportedOpWarning

__all__ = [
    "AutoTPError", "CaptureError", "CheckpointError", "ConfigError", "Crossover", "CrossoverReport", "InfeasiblePlanError", "InputMismatchError", "Partial", "Plan",
    "PeerRankError", "PlanFormatError", "PlanMismatchError", "Replicate", "SetupTimeoutError", "Shard", "SolverError", "TargetError", "TorchTPExportError", "UnsupportedOpWarning",
    "crossovers", "full_state_dict", "load_full_checkpoint", "load_sharded_state_dict", "manual_seed", "parallelize", "plan", "save_pretrained", "sharded_state_dict",
    "verify", "VerifyReport",
]
