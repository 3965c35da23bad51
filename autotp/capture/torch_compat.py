"""Every private torch name autotp uses, in one place.

torch promises nothing about names with a leading underscore, ``torch.fx.experimental`` or
``torch.utils._pytree``; they move between releases. Reaching them only through this module means a
torch upgrade breaks in one file, with an error that names the torch version and the missing name,
and ``tests/test_torch_compat.py`` checks that no other autotp module reaches for one.

Two kinds of names live here:

- eager ones autotp cannot work without (pytree, ``OpOverload``): imported at import time, so a
  torch without them fails at ``import autotp``;
- lazy ones only one feature needs (resolving a process group by name, the grad-mode higher-order
  op): looked up on first use, so ``import autotp`` and the other features survive their absence,
  and the feature raises :class:`TorchCompatError`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch._ops import OpOverload, OpOverloadPacket
from torch.utils import _pytree as pytree

from autotp.errors import AutoTPError

if TYPE_CHECKING:
    import torch.distributed as dist

__all__ = [
    "OpOverload", "OpOverloadPacket", "TESTED_TORCH", "TorchCompatError", "UntestedTorchWarning", "aten_op",
    "c10d_functional", "check_torch_version", "child_modules", "data_dependent_guard_error", "dtensor_registered_ops", "hf_init_weights",
    "non_persistent_buffer_names", "opinfo_database", "own_state_slots", "op_schema", "pytree", "resolve_process_group",
    "set_grad_enabled_hop", "unbacked_sizes",
]

# The torch releases CI runs the suite on: [low, high) as (major, minor). pyproject.toml's
# requirement says the same (``torch>=2.13,<2.14``); tests/test_torch_compat.py keeps them equal.
TESTED_TORCH = ((2, 13), (2, 14))


class TorchCompatError(AutoTPError):
    """The installed torch lacks a name autotp needs: it was renamed or moved in this release."""


class UntestedTorchWarning(UserWarning):
    """The installed torch is outside the releases autotp is tested on."""


def _version_tuple(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_torch_version(version: str = torch.__version__) -> bool:
    """Warn (not fail) when ``version`` is outside :data:`TESTED_TORCH`; True when it is inside.

    A newer torch usually works; when it does not, the warning is the first line to read.
    """
    low, high = TESTED_TORCH
    found = _version_tuple(version)
    if found is not None and low <= found < high:
        return True
    warnings.warn(
        f"autotp is tested on torch >={low[0]}.{low[1]},<{high[0]}.{high[1]}; this is torch {version}. "
        "If capture or a collective fails with TorchCompatError, install a tested torch "
        f"(pip install 'torch>={low[0]}.{low[1]},<{high[0]}.{high[1]}')",
        UntestedTorchWarning,
        stacklevel=2,
    )
    return False


check_torch_version()


def _lookup(module: str, name: str) -> Any:
    """``module.name``, or a :class:`TorchCompatError` naming both and the torch version."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise TorchCompatError(
            f"torch {torch.__version__} has no {module}.{name}, which autotp needs here; it was renamed "
            f"or moved in this torch release. Install a torch in the tested range "
            f">={TESTED_TORCH[0][0]}.{TESTED_TORCH[0][1]},<{TESTED_TORCH[1][0]}.{TESTED_TORCH[1][1]}"
        ) from exc


# --- lazy names: one feature each -----------------------------------------------------------------


@functools.cache
def set_grad_enabled_hop() -> Any:
    """The higher-order op ``torch.export`` wraps a ``torch.no_grad()`` region in."""
    return _lookup("torch._higher_order_ops.wrap", "wrap_with_set_grad_enabled")


@functools.cache
def data_dependent_guard_error() -> type[BaseException]:
    """The exception ``torch.export`` raises when ``forward`` branches on a tensor's values."""
    error: type[BaseException] = _lookup("torch.fx.experimental.symbolic_shapes", "GuardOnDataDependentSymNode")
    return error


@functools.cache
def _free_unbacked_symbols() -> Any:
    return _lookup("torch.fx.experimental.symbolic_shapes", "free_unbacked_symbols")


def unbacked_sizes(shape: torch.Size) -> tuple[str, ...]:
    """The sizes in a fake tensor's ``shape`` known only when the op runs (``nonzero``'s row
    count: ``("u0",)``); empty for a shape fixed at capture."""
    return tuple(sorted(str(s) for s in _free_unbacked_symbols()(shape)))


@functools.cache
def _process_group_resolver() -> Any:
    return _lookup("torch.distributed.distributed_c10d", "_resolve_process_group")


def resolve_process_group(group_name: str) -> dist.ProcessGroup:
    """The process group registered under ``group_name`` (the name a traced collective carries)."""
    group: dist.ProcessGroup = _process_group_resolver()(group_name)
    return group


@functools.cache
def c10d_functional() -> Any:
    """The functional collectives (``all_reduce``, ``all_gather_into_tensor``,
    ``reduce_scatter_tensor``, ``wait_tensor``): each returns its result at once, still being
    written until ``wait_tensor`` of it, so a graph can compute while it communicates."""
    return _lookup("torch.ops", "_c10d_functional")


def opinfo_database() -> list[Any]:
    """PyTorch's operator corpus (``OpInfo`` entries with sample inputs), for the conformance run
    ``autotp.testing.opinfo``. Imported here, on first use: the import takes seconds and is for
    tests; it needs the test-only package ``expecttest`` (the ``test`` extra)."""
    if importlib.util.find_spec("expecttest") is None:
        raise TorchCompatError(
            "the OpInfo corpus (torch.testing._internal) needs the package expecttest, which is not installed; "
            "install the test extras: pip install -e '.[test]'"
        )
    database: list[Any] = _lookup("torch.testing._internal.common_methods_invocations", "op_db")
    return database


def dtensor_registered_ops() -> frozenset[OpOverload]:
    """Every ATen overload DTensor has a sharding strategy or rule for (the keys of its sharding
    propagator's tables), to measure autotp's coverage against."""
    propagator = _lookup("torch.distributed.tensor", "DTensor")._op_dispatcher.sharding_propagator
    tables = ("op_strategy_funcs", "op_single_dim_strategy_funcs", "op_to_rules")
    missing = [t for t in tables if not hasattr(propagator, t)]
    if missing:
        raise TorchCompatError(
            f"torch {torch.__version__}'s DTensor sharding propagator has no {', '.join(missing)}; its tables were renamed. "
            "Install a torch in the tested range or update autotp.capture.torch_compat.dtensor_registered_ops"
        )
    return frozenset(op for table in tables for op in getattr(propagator, table) if isinstance(op, OpOverload))


# --- private attributes of public objects ---------------------------------------------------------


def op_schema(target: Any) -> torch.FunctionSchema | None:
    """The schema of an ATen op (``OpOverload._schema``); None for a Python callable like ``getitem``."""
    return getattr(target, "_schema", None)


def child_modules(module: nn.Module) -> dict[str, nn.Module | None]:
    """``module``'s direct submodules by attribute name, the dict ``add_module`` writes to."""
    return module._modules


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """Names of ``module``'s own buffers registered with ``persistent=False`` (not in its state dict)."""
    return module._non_persistent_buffers_set


def own_state_slots(module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """``module``'s own parameter and buffer dicts (name -> tensor or None), which initialising in
    parts swaps full-size tensors into for a moment."""
    return module._parameters, module._buffers


def hf_init_weights(module: nn.Module) -> Any:
    """A Hugging Face model's per-module initialiser ``_init_weights(module)``, or None."""
    hook = getattr(module, "_init_weights", None)
    return hook if callable(hook) else None


# --- ATen op names kept as strings ----------------------------------------------------------------


def aten_op(name: str) -> OpOverload | OpOverloadPacket | None:
    """``"aten.mul.Tensor"`` -> ``torch.ops.aten.mul.Tensor``, ``"aten.mul"`` -> its packet; None
    when this torch has no such op (or ``name`` is not in the ``aten`` namespace)."""
    namespace, _, rest = name.partition(".")
    packet_name, _, overload = rest.partition(".")
    if namespace != "aten" or not packet_name:
        return None
    packet = getattr(torch.ops.aten, packet_name, None)
    if packet is None or not overload:
        return packet
    return getattr(packet, overload, None)
