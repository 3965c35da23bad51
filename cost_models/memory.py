"""Bytes one device holds for a model's state: parameters, gradients and optimizer state.

Per parameter element, training with AdamW holds the parameter, its gradient (same dtype), and
two fp32 moments: ``2·itemsize + 8`` bytes (Adam, Kingma & Ba 2015; PyTorch keeps ``exp_avg`` and
``exp_avg_sq`` in the parameter's dtype unless it is low precision, where mixed-precision
recipes keep fp32 masters; 8 bytes is the fp32 case).

Activations are priced by :func:`peak_live_nbytes`, a liveness sweep over the intervals in
which values are alive; the caller (``autotp.cost.activations``) derives them from the graph.
"""
from __future__ import annotations

from collections.abc import Iterable

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


def peak_live_nbytes(intervals: Iterable[tuple[int, int, float]]) -> float:
    """The largest total size of values alive at the same step.

    Each value is ``(first, last, nbytes)``: made at step ``first`` and read for the last time
    at step ``last`` (inclusive; ``last >= first``), so it occupies memory over
    ``[first, last]``. A sweep over the steps in order:

        peak = max over steps s of  Σ nbytes of the values with first <= s <= last

    e.g. a chain x -> y -> z of 4, 8 and 2 bytes, each read only by the next step:
    ``[(0, 1, 4), (1, 2, 8), (2, 2, 2)]`` peaks at step 1 (x and y, 12 bytes) while z and y
    together make 10.
    """
    events: dict[int, float] = {}
    for first, last, nbytes in intervals:
        if last < first:
            raise ValueError(f"a value cannot die (step {last}) before it is made (step {first})")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        events[first] = events.get(first, 0.0) + nbytes
        events[last + 1] = events.get(last + 1, 0.0) - nbytes
    live = peak = 0.0
    for step in sorted(events):
        live += events[step]
        peak = max(peak, live)
    return peak
