"""Initialise a meta model's parameters and buffers shard by shard, so no rank holds a whole model.

``init_shards`` gives this rank its part of each ``StateTarget``. With an ``init_fn`` it fills
each part directly. Without one it replays the modules' own initialisers one module at a time:
each module that owns a targeted meta tensor gets full-size real tensors for a moment, runs its
``reset_parameters()`` (torch's convention) and then ``_init_weights(module)`` of the innermost
module around it that has one (Hugging Face's convention, which also recomputes rotary
``inv_freq``; a wrapper around a Hugging Face model finds the model's), and keeps only this
rank's slice. Peak memory is this rank's shares plus one module's own tensors.

Reproduced exactly: when a model's init is each module's own initialiser, run at the end of that
module's construction (so modules are initialised in construction order: children before
parents, as ``nn.Module.apply`` visits them), the model built with ``torch.manual_seed(s)``
equals the gathered shards of the meta model replayed after ``torch.manual_seed(s)`` on CPU.
torch's layers and autotp's built-in examples are built this way. Tied tensors take the value
of the first module that initialises them; later owners still draw, so random streams stay in
step, as construction followed by tying does.

Not reproduced (the distributions are right when the initialisers are, the values differ):

- a model-level pass after construction that re-draws other modules' tensors, such as
  nanoGPT's ``self.apply(self._init_weights)`` with random draws, or Hugging Face's init
  order in ``from_config`` (construction, then ``_init_weights`` over every module);
- a module that draws for its own tensors before building its children;
- initialising on another device than the reference: CUDA and CPU generators differ;
- an ``init_fn`` whose values depend on the local shape rather than the global index.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from autotp.capture.torch_compat import hf_init_weights, own_state_slots
from autotp.errors import ConfigError
from autotp.runtime.targets import LocalShard, StateTarget

InitFn = Callable[[str, torch.Tensor, torch.Size, LocalShard], None]
"""``(name, local tensor to fill in place, global shape, where the local part lies)``."""

InitWeights = Callable[[nn.Module], object]  # a model's ``_init_weights(module)``
_LISTED = 5  # uncovered tensors named in the error; the rest are counted


def init_shards(
    model: nn.Module, targets: Sequence[StateTarget], *, init_fn: InitFn | None, device: torch.device | None,
) -> dict[str, torch.Tensor]:
    """This rank's part of each target (all on the meta device in ``model``), by ``target.name``:
    plain tensors of ``target.dtype`` on ``device`` (None: CPU). Without ``init_fn``, a ``ConfigError``
    names the targets no initialiser sets, before any rank runs with uninitialised memory."""
    device = torch.device("cpu") if device is None else device
    with torch.no_grad():
        if init_fn is not None:
            return {t.name: _init_by_fn(t, init_fn, device) for t in targets}
        return _replay(model, targets, device)


def _init_by_fn(target: StateTarget, init_fn: InitFn, device: torch.device) -> torch.Tensor:
    local = torch.empty(target.shard.shape, dtype=target.dtype, device=device)
    init_fn(target.name, local, torch.Size(target.global_shape), target.shard)
    return local


def _replay(model: nn.Module, targets: Sequence[StateTarget], device: torch.device) -> dict[str, torch.Tensor]:
    by_tensor = {id(_meta_state(model, t)): t for t in targets}
    shards: dict[str, torch.Tensor] = {}
    for module, init_weights in _post_order(model, None, set()):
        slots_of: tuple[dict[str, Any], ...] = own_state_slots(module)
        owned = [(slots, name, tensor) for slots in slots_of for name, tensor in slots.items() if tensor is not None and tensor.is_meta]
        initialisers = _initialisers(module, init_weights)
        if not initialisers or not any(id(tensor) in by_tensor for _, _, tensor in owned):
            continue
        try:
            for slots, name, tensor in owned:
                slots[name] = _full(tensor, device)
            for initialise in initialisers:
                initialise()
            _keep_parts(owned, by_tensor, shards, device)
        finally:
            for slots, name, tensor in owned:
                slots[name] = tensor
    missing = [t.name for t in targets if t.name not in shards]
    if missing:
        listed = ", ".join(missing[:_LISTED]) + (f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else "")
        raise ConfigError(
            f"no initialiser covers {len(missing)} meta tensor(s) of {type(model).__name__}: {listed}. "
            "Without weights= each rank initialises its part by replaying the owning module's reset_parameters() "
            "(or the model's _init_weights(module)), and these modules have none or it left the tensor unset. "
            "Give the module a reset_parameters(), pass init_fn= to initialise tensors by name, or pass weights= "
            "to load them from a checkpoint."
        )
    return {t.name: shards[t.name] for t in targets}


def _keep_parts(
    owned: list[tuple[dict[str, Any], str, torch.Tensor]], by_tensor: dict[int, StateTarget], shards: dict[str, torch.Tensor], device: torch.device,
) -> None:
    """Copy this rank's part of each freshly initialised full tensor (a function of its own, so no
    reference to a full tensor outlives it: the next module's are allocated while the model holds these only)."""
    for slots, name, tensor in owned:
        target = by_tensor.get(id(tensor))
        full = slots[name]
        if target is None or target.name in shards or full is None:
            continue
        part = torch.empty(target.shard.shape, dtype=target.dtype, device=device).copy_(full[target.shard.index])
        if not _untouched(part):  # an initialiser that leaves a tensor alone leaves every part of it NaN
            shards[target.name] = part


def _meta_state(model: nn.Module, target: StateTarget) -> torch.Tensor:
    owner, _, leaf = target.name.rpartition(".")
    tensor = getattr(model.get_submodule(owner) if owner else model, leaf)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_meta:
        where = tensor.device if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ConfigError(
            f"init_shards initialises tensors on the meta device, but {target.name} is on {where}; "
            "slice a real tensor instead of initialising it"
        )
    return tensor


def _post_order(module: nn.Module, init_weights: InitWeights | None, seen: set[int]) -> Iterator[tuple[nn.Module, InitWeights | None]]:
    """Children before parents, each module once (a shared module is built, and initialised, once),
    with the ``_init_weights`` of the innermost module around it (itself included) that has one."""
    init_weights = hf_init_weights(module) or init_weights
    for child in module.children():
        if id(child) not in seen:
            seen.add(id(child))
            yield from _post_order(child, init_weights, seen)
    yield module, init_weights


def _initialisers(module: nn.Module, init_weights: InitWeights | None) -> list[Callable[[], object]]:
    """The module's own ``reset_parameters``, then the model's ``_init_weights`` on it: Hugging Face
    and nanoGPT-style models construct their layers (torch's init) and then re-initialise each one."""
    initialisers: list[Callable[[], object]] = []
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        initialisers.append(reset)
    if init_weights is not None:
        initialisers.append(partial(init_weights, module))
    return initialisers


def _full(meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A real tensor of ``meta``'s shape for an initialiser to fill: NaN where the dtype has one, so a
    tensor the initialiser leaves alone is found (``_untouched``) instead of kept as garbage."""
    if meta.dtype.is_floating_point or meta.dtype.is_complex:
        full = torch.full(meta.shape, float("nan"), dtype=meta.dtype, device=device)
    else:
        full = torch.empty(meta.shape, dtype=meta.dtype, device=device)
    return nn.Parameter(full, requires_grad=meta.requires_grad) if isinstance(meta, nn.Parameter) else full


def _untouched(full: torch.Tensor) -> bool:
    return (full.dtype.is_floating_point or full.dtype.is_complex) and bool(full.isnan().any())
