"""The one table of placement transitions: (src, dst) -> the steps that convert one into the other.

Both the cost model and the rewriter read it, so what is priced is exactly what runs.

    src \\ dst | R            | S(j)             | P
    ----------+--------------+------------------+------------
    R         | -            | local chunk      | to_partial (rank 0 keeps it, others zeros)
    S(i)      | all-gather i | all-to-all i->j  | not offered
    P         | all-reduce   | reduce-scatter j | -
"""
from __future__ import annotations

from autotp.ir.placement import Partial, Placement, Replicate, Shard
from autotp.ir.steps import Step, StepKind


def transition(src: Placement, dst: Placement) -> tuple[Step, ...] | None:
    """Steps from ``src`` to ``dst`` (empty when equal), or ``None`` when not offered."""
    if src == dst:
        return ()
    if isinstance(src, Replicate):
        if isinstance(dst, Shard):
            return (Step(StepKind.LOCAL_CHUNK, dst_dim=dst.dim),)
        return (Step(StepKind.TO_PARTIAL),)
    if isinstance(src, Shard):
        if isinstance(dst, Replicate):
            return (Step(StepKind.ALL_GATHER, src_dim=src.dim),)
        if isinstance(dst, Shard):
            return (Step(StepKind.ALL_TO_ALL, src_dim=src.dim, dst_dim=dst.dim),)
        return None
    assert isinstance(src, Partial)
    if isinstance(dst, Replicate):
        return (Step(StepKind.ALL_REDUCE),)
    assert isinstance(dst, Shard)  # Partial -> Partial returned () above
    return (Step(StepKind.REDUCE_SCATTER, dst_dim=dst.dim),)


def backward_steps(step: Step) -> tuple[Step, ...]:
    """What the backward pass runs for ``step`` (see ``autotp.comm.collectives`` for why)."""
    if step.kind in (StepKind.ALL_REDUCE, StepKind.TO_PARTIAL):
        return ()  # identity
    if step.kind is StepKind.ALL_GATHER:
        return (Step(StepKind.LOCAL_CHUNK, dst_dim=step.src_dim),)
    if step.kind is StepKind.REDUCE_SCATTER:
        return (Step(StepKind.ALL_GATHER, src_dim=step.dst_dim),)
    if step.kind is StepKind.ALL_TO_ALL:
        return (Step(StepKind.ALL_TO_ALL, src_dim=step.dst_dim, dst_dim=step.src_dim),)
    return (Step(StepKind.ALL_GATHER, src_dim=step.dst_dim),)  # local chunk


# An R input of an op whose output is split or partial gets a partial-sum gradient, summed by an
# all-reduce in backward (Megatron-LM's ``f``); the forward is the identity.
GRAD_SYNC = Step(StepKind.ALL_REDUCE)
