"""Bytes one device holds for a model's state: parameters, gradients and optimizer state.

Per parameter element, training with AdamW holds the parameter, its gradient (same dtype), and
two fp32 moments: ``2·itemsize + 8`` bytes (Adam, Kingma & Ba 2015; PyTorch keeps ``exp_avg`` and
``exp_avg_sq`` in the parameter's dtype unless it is low precision, where mixed-precision
recipes keep fp32 masters; 8 bytes is the fp32 case).
"""
from __future__ import annotations

OPTIMIZER_STATE_BYTES_PER_ELEMENT: dict[str, int] = {
    "none": 0,
    "sgd": 0,
    "sgd-momentum": 4,  # one fp32 momentum buffer
    "adam": 8,  # exp_avg + exp_avg_sq, fp32
    "adamw": 8,
}


def state_nbytes(*, param_nbytes: float, numel: float, training: bool, optimizer: str | None) -> float:
    """Bytes for one parameter (or its shard) of ``numel`` elements and ``param_nbytes`` bytes."""
    if not training:
        return float(param_nbytes)
    key = (optimizer or "none").lower()
    if key not in OPTIMIZER_STATE_BYTES_PER_ELEMENT:
        known = ", ".join(sorted(OPTIMIZER_STATE_BYTES_PER_ELEMENT))
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {known}")
    return 2.0 * param_nbytes + OPTIMIZER_STATE_BYTES_PER_ELEMENT[key] * numel
