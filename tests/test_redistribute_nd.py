"""N-D transitions, simulated rank by rank in one process: every (src, dst) pair of placements on
(2, 2), (2, 3) and (2, 2, 2) meshes, nested splits of one dim included, must turn the ranks' src
tensors into their dst tensors, running each step as ``autotp.comm.collectives`` does."""
from __future__ import annotations

import itertools

import pytest
import torch

from autotp.comm.redistribute import step_placements, transition
from autotp.ir.placement import P, Placements, R, Shard, local_chunk
from autotp.ir.steps import Step, StepKind

Locals = dict[tuple[int, ...], torch.Tensor]


def _coords(mesh_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(n) for n in mesh_shape)))


def _lay_out(full: torch.Tensor, placements: Placements, mesh_shape: tuple[int, ...], generator: torch.Generator) -> Locals:
    """Every rank's tensor: its chunk of ``full``, as random summands over each ``P`` axis."""
    out = {c: local_chunk(full, placements, mesh_shape, c).clone() for c in _coords(mesh_shape)}
    for axis, p in enumerate(placements):
        if p != P:
            continue
        for coord in _coords(mesh_shape):
            if coord[axis] == 0:  # this group's summands: noise on the others, the rest on coordinate 0
                group = [coord[:axis] + (k,) + coord[axis + 1:] for k in range(mesh_shape[axis])]
                total = out[coord]
                for other in group[1:]:
                    out[other] = torch.randn(total.shape, generator=generator)
                out[coord] = total - sum(out[o] for o in group[1:])
    return out


def _run(step: Step, locals_: Locals, mesh_shape: tuple[int, ...]) -> Locals:
    a, n = step.axis, mesh_shape[step.axis]
    out: Locals = {}
    for coord in locals_:
        group = [locals_[coord[:a] + (k,) + coord[a + 1:]] for k in range(n)]
        me = coord[a]
        if step.kind is StepKind.ALL_GATHER:
            out[coord] = torch.cat(group, dim=step.src_dim)
        elif step.kind is StepKind.ALL_REDUCE:
            out[coord] = sum(group)
        elif step.kind is StepKind.REDUCE_SCATTER:
            out[coord] = sum(group).chunk(n, dim=step.dst_dim)[me]
        elif step.kind is StepKind.ALL_TO_ALL:
            out[coord] = torch.cat([x.chunk(n, dim=step.dst_dim)[me] for x in group], dim=step.src_dim)
        elif step.kind is StepKind.LOCAL_CHUNK:
            out[coord] = locals_[coord].chunk(n, dim=step.dst_dim)[me]
        else:  # to_partial
            out[coord] = locals_[coord] if me == 0 else torch.zeros_like(locals_[coord])
    return out


def _holds(locals_: Locals, full: torch.Tensor, placements: Placements, mesh_shape: tuple[int, ...]) -> bool:
    """The ranks hold ``full`` laid out as ``placements``: summed over the ``P`` axes, each rank's chunk."""
    partial = [a for a, p in enumerate(placements) if p == P]
    whole = tuple(R if p == P else p for p in placements)
    for coord in _coords(mesh_shape):
        group = [c for c in _coords(mesh_shape) if all(c[a] == coord[a] for a in range(len(mesh_shape)) if a not in partial)]
        total = sum(locals_[c] for c in group)
        if not torch.allclose(total, local_chunk(full, whole, mesh_shape, coord), atol=1e-5):
            return False
    return True


def _placements(mesh_shape: tuple[int, ...], shape: tuple[int, ...]) -> list[Placements]:
    options = [R, P, *(Shard(d) for d in range(len(shape)))]
    out = []
    for combo in itertools.product(options, repeat=len(mesh_shape)):
        split: dict[int, int] = {}
        for axis, p in enumerate(combo):
            if isinstance(p, Shard):
                split[p.dim] = split.get(p.dim, 1) * mesh_shape[axis]
        if all(shape[d] % k == 0 for d, k in split.items()):
            out.append(combo)
    return out


@pytest.mark.parametrize("mesh_shape", [(2, 2), (2, 3), (2, 2, 2)])
def test_every_transition_moves_the_ranks_tensors_to_the_target_layout(mesh_shape: tuple[int, ...]) -> None:
    shape = (12, 8)
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(shape, generator=generator)
    placements = _placements(mesh_shape, shape)
    checked = nested = 0
    for src, dst in itertools.product(placements, repeat=2):
        steps = transition(src, dst)
        if steps is None:
            assert any(isinstance(s, Shard) and d == P for s, d in zip(src, dst)), (src, dst)  # only S -> P is not offered
            continue
        locals_ = _lay_out(full, src, mesh_shape, generator)
        for step in steps:
            locals_ = _run(step, locals_, mesh_shape)
        assert _holds(locals_, full, dst, mesh_shape), (src, dst, [str(s) for s in steps])
        assert len(step_placements(src, steps)) == len(steps)
        checked += 1
        nested += any(len({p.dim for p in ps if isinstance(p, Shard)}) < sum(isinstance(p, Shard) for p in ps) for ps in (src, dst))
    assert checked > 100 and nested > 10  # nested splits of one dim were among them


def test_a_nested_split_is_gathered_inner_axis_first() -> None:
    steps = transition((Shard(0), Shard(0)), (R, R))
    assert [s.axis for s in steps] == [1, 0]
    assert all(s.kind is StepKind.ALL_GATHER for s in steps)


def test_an_unchanged_inner_split_is_redone_around_a_new_outer_one() -> None:
    steps = transition((R, Shard(0)), (Shard(0), Shard(0)))
    assert [(s.kind, s.axis) for s in steps] == [(StepKind.ALL_GATHER, 1), (StepKind.LOCAL_CHUNK, 0), (StepKind.LOCAL_CHUNK, 1)]


def test_disjoint_dims_keep_the_all_to_all() -> None:
    steps = transition((Shard(0), Shard(1)), (Shard(0), Shard(2)))
    assert [(s.kind, s.axis) for s in steps] == [(StepKind.ALL_TO_ALL, 1)]
