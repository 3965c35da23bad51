"""The one table of placement transitions: (src, dst) -> the steps that convert one into the other.

Both the cost model and the rewriter read it, so what is priced is exactly what runs. On one
mesh axis:

    src \\ dst | R            | S(j)             | P
    ----------+--------------+------------------+------------
    R         | -            | local chunk      | to_partial (rank 0 keeps it, others zeros)
    S(i)      | all-gather i | all-to-all i->j  | not offered
    P         | all-reduce   | reduce-scatter j | -

On an N-D mesh each axis whose placement changes runs its row of the table over that axis's
groups, on the tensor as the other axes leave it (``step_placements``). Several axes may split
one dim, nested in axis order (axis 0 outermost: DTensor's order), so a step on one dim must run
on its innermost splitting axis: first every axis that stops splitting gathers, innermost first
(an all-to-all instead when no other axis touches either dim), then every axis that starts
splitting does, outermost first; an unchanged split nested inside a changing one on the same dim
is gathered and split again (``_axes_to_redo``).
"""
from __future__ import annotations

from autotp.ir.placement import Partial, Placement, Placements, Replicate, Shard
from autotp.ir.steps import Step, StepKind


def axis_transition(src: Placement, dst: Placement, axis: int = 0) -> tuple[Step, ...] | None:
    """Steps from ``src`` to ``dst`` on one mesh axis (empty when equal), or ``None`` when not offered."""
    if src == dst:
        return ()
    if isinstance(src, Replicate):
        if isinstance(dst, Shard):
            return (Step(StepKind.LOCAL_CHUNK, dst_dim=dst.dim, axis=axis),)
        return (Step(StepKind.TO_PARTIAL, axis=axis),)
    if isinstance(src, Shard):
        if isinstance(dst, Replicate):
            return (Step(StepKind.ALL_GATHER, src_dim=src.dim, axis=axis),)
        if isinstance(dst, Shard):
            return (Step(StepKind.ALL_TO_ALL, src_dim=src.dim, dst_dim=dst.dim, axis=axis),)
        return None
    assert isinstance(src, Partial)
    if isinstance(dst, Replicate):
        return (Step(StepKind.ALL_REDUCE, axis=axis),)
    assert isinstance(dst, Shard)  # Partial -> Partial returned () above
    return (Step(StepKind.REDUCE_SCATTER, dst_dim=dst.dim, axis=axis),)


def transition(src: Placements, dst: Placements) -> tuple[Step, ...] | None:
    """Steps from ``src`` to ``dst`` over all mesh axes, or ``None`` when some axis's change is not offered."""
    if any(axis_transition(s, d) is None for s, d in zip(src, dst)):
        return None
    redo = _axes_to_redo(src, dst)
    state = list(src)
    steps: list[Step] = []

    def run(axis: int, to: Placement) -> None:
        steps.extend(axis_transition(state[axis], to, axis))  # type: ignore[arg-type]  # offered: checked above
        state[axis] = to

    for axis in reversed(range(len(src))):  # stop splitting, innermost axis first
        s, d = state[axis], dst[axis]
        if redo[axis] and isinstance(s, Shard):
            run(axis, d if isinstance(d, Shard) and _alone(s.dim, d.dim, axis, src, dst) else Replicate())
    for axis in range(len(src)):  # start splitting (outermost first), reduce, or make partial
        if state[axis] != dst[axis]:
            run(axis, dst[axis])
    return tuple(steps)


def _dim(p: Placement) -> int | None:
    return p.dim if isinstance(p, Shard) else None


def _axes_to_redo(src: Placements, dst: Placements) -> list[bool]:
    """The axes whose placement changes, and the unchanged splits nested inside one that does on
    the same dim: they must be gathered first and split again after (e.g. ``(R, S(0)) -> (S(0), S(0))``)."""
    redo = [s != d for s, d in zip(src, dst)]
    for axis, p in enumerate(src):
        if not redo[axis] and isinstance(p, Shard):
            redo[axis] = any(redo[b] and p.dim in (_dim(src[b]), _dim(dst[b])) for b in range(axis))
    return redo


def _alone(src_dim: int, dst_dim: int, axis: int, src: Placements, dst: Placements) -> bool:
    """No other axis splits ``src_dim`` or ``dst_dim`` before or after: an all-to-all on ``axis``
    is then exact."""
    return all(_dim(p) not in (src_dim, dst_dim) for a, p in (*enumerate(src), *enumerate(dst)) if a != axis)


def step_placements(src: Placements, steps: tuple[Step, ...]) -> list[Placements]:
    """The tensor's placements before each step of ``transition(src, ...)``: a step moves the
    tensor as the *other* axes leave it, which is what it costs."""
    state = list(src)
    before = []
    for step in steps:
        before.append(tuple(state))
        state[step.axis] = _after(step)
    return before


def _after(step: Step) -> Placement:
    if step.kind in (StepKind.ALL_GATHER, StepKind.ALL_REDUCE):
        return Replicate()
    if step.kind is StepKind.TO_PARTIAL:
        return Partial()
    return Shard(step.dst_dim)  # type: ignore[arg-type]  # the splitting steps name their dim


def backward_steps(step: Step) -> tuple[Step, ...]:
    """What the backward pass runs for ``step`` (see ``autotp.comm.collectives`` for why)."""
    axis = step.axis
    if step.kind in (StepKind.ALL_REDUCE, StepKind.TO_PARTIAL):
        return ()  # identity
    if step.kind is StepKind.ALL_GATHER:
        return (Step(StepKind.LOCAL_CHUNK, dst_dim=step.src_dim, axis=axis),)
    if step.kind is StepKind.REDUCE_SCATTER:
        return (Step(StepKind.ALL_GATHER, src_dim=step.dst_dim, axis=axis),)
    if step.kind is StepKind.ALL_TO_ALL:
        return (Step(StepKind.ALL_TO_ALL, src_dim=step.dst_dim, dst_dim=step.src_dim, axis=axis),)
    return (Step(StepKind.ALL_GATHER, src_dim=step.dst_dim, axis=axis),)  # local chunk


def grad_sync_step(axis: int) -> Step:
    """An R input of an op whose output is split or partial on ``axis`` gets a partial-sum
    gradient there, summed by an all-reduce over that axis in backward (Megatron-LM's ``f``);
    the forward is the identity."""
    return Step(StepKind.ALL_REDUCE, axis=axis)
