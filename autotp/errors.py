"""Public error types: one base class, one subclass per way a user's input can be wrong."""
from __future__ import annotations

import os
import re

import torch


class AutoTPError(Exception):
    """Base class of every error autotp raises on purpose."""


class CaptureError(AutoTPError):
    """The model could not be captured as a graph by ``torch.export``."""


class InfeasiblePlanError(AutoTPError):
    """No plan satisfies the constraints (for example the memory budget)."""


class PlanMismatchError(AutoTPError):
    """A plan was applied to a graph it was not made for."""


class PeerRankError(AutoTPError):
    """Another rank of the mesh failed during ``parallelize``'s set-up (it raised the original
    error); this rank stops too instead of waiting for it in a collective."""


class SetupTimeoutError(AutoTPError, TimeoutError):
    """A set-up collective of ``parallelize`` did not complete within ``setup_timeout_s``, or lost a
    rank: one rank crashed, hangs, or does not call ``parallelize``."""


class CheckpointError(AutoTPError):
    """A checkpoint to load weights from is missing, unreadable, or does not match the model: a
    file or tensor is absent, truncated, or of another shape or dtype (the message names it)."""


class SolverError(AutoTPError):
    """The ILP solver failed or returned no usable solution."""


class SolverTimeLimitWarning(UserWarning):
    """The solver stopped at its time limit (or its node limit before any plan): the plan is the
    deterministic fallback, not the solver's incumbent."""


class ConfigError(AutoTPError, ValueError):
    """An argument is malformed: a memory budget string, a mesh shape, a hardware name."""


class TargetError(ConfigError):
    """The CLI's ``TARGET`` (``path/to/file.py:function`` or ``package.module:function``) could not
    be loaded or built: its file has a syntax error, an import in it fails, or the function raised."""


class InputMismatchError(AutoTPError, TypeError):
    """The sharded module was called with arguments its planned graph cannot take (a scalar, shape
    or dtype other than planned, an argument that was not in ``example_inputs``)."""


class PlanFormatError(AutoTPError, ValueError):
    """A saved plan file is malformed, has unknown fields or a schema version this autotp cannot read."""


def source_line(stack_trace: str | None) -> str:
    """The user's line a graph node came from, as ``model.py:42: y = self.fc(x)`` (JAX-style errors
    point there): the innermost frame outside torch, ``""`` when the capture recorded none."""
    lines = (stack_trace or "").splitlines()
    frames = []
    for k, line in enumerate(lines):
        match = _FRAME.match(line.strip())
        if match is not None:
            code = lines[k + 1].strip() if k + 1 < len(lines) and not _FRAME.match(lines[k + 1].strip()) else ""
            frames.append((match.group("path"), match.group("line"), code))
    user = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    if not user:
        return ""
    path, line, code = user[-1]
    return f"{path}:{line}: {code}" if code else f"{path}:{line}"


_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+)')
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def describe_node(name: str, op: str, module_path: str = "", source: str = "") -> str:
    """One line naming a graph node for an error message: its name, op, module and the user's source line."""
    return f"node '{name}' ({op})" + (f" in module '{module_path}'" if module_path else "") + (f" at {source}" if source else "")


class TorchTPExportError(AutoTPError):
    """A plan cannot be handed to PyTorch's ``parallelize_module`` styles and still run as planned."""
