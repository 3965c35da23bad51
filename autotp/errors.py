"""Public error types: one base class, one subclass per way a user's input can be wrong."""
from __future__ import annotations

from torch import fx


class AutoTPError(Exception):
    """Base class of every error autotp raises on purpose."""


class CaptureError(AutoTPError):
    """The model could not be captured as a graph by ``torch.export``."""


class InfeasiblePlanError(AutoTPError):
    """No plan satisfies the constraints (for example the memory budget)."""


class PlanMismatchError(AutoTPError):
    """A plan was applied to a graph it was not made for."""


class SolverError(AutoTPError):
    """The ILP solver failed or returned no usable solution."""


class SolverTimeLimitWarning(UserWarning):
    """The solver stopped at its time limit (or its node limit before any plan): the plan is the
    deterministic fallback, not the solver's incumbent."""


class ConfigError(AutoTPError, ValueError):
    """An argument is malformed: a memory budget string, a mesh shape, a hardware name."""


class InputMismatchError(AutoTPError, TypeError):
    """The sharded module was called with arguments its planned graph cannot take (a scalar, shape
    or dtype other than planned, an argument that was not in ``example_inputs``)."""


class PlanFormatError(AutoTPError, ValueError):
    """A saved plan file is malformed, has unknown fields or a schema version this autotp cannot read."""


def describe_node(node: fx.Node) -> str:
    """One line naming a graph node, its op, its output shape and the user's source line."""
    val = node.meta.get("val")
    shape = tuple(val.shape) if val is not None and hasattr(val, "shape") else None
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    where = ""
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
        where = f" at {lines[-2]}: {lines[-1]}" if len(lines) >= 2 else f" at {lines[-1]}"
    module_part = f" in module '{module}'" if module else ""
    return f"node '{node.name}' ({node.target}, shape {shape}){module_part}{where}"


class TorchTPExportError(AutoTPError):
    """A plan cannot be handed to PyTorch's ``parallelize_module`` styles and still run as planned."""
