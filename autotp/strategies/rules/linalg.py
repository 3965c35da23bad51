"""Batched linear algebra: split the batch dims, never the matrix dims.

``torch.linalg`` ops act on the last two dims of each matrix (one dim of a pivot, tau or
eigenvalue vector, none of a per-matrix scalar such as ``det`` or ``info``) and on each batch
entry on its own, so splitting a batch dim of every tensor and every output alike is exact:
each rank runs the same kernel on its own matrices. Batch dims broadcast as in pointwise ops: an
input that lacks a batch dim or has it of size 1 stays ``R``. The solves are linear in their
right-hand side, so a partial sum there passes through to the solution (``P`` in, ``P`` out),
and with the coefficients whole the columns of a matrix right-hand side split (``S(-1)``).
Decompositions whose outputs are not unique (eigenvectors, singular vectors, QR) are still exact
per batch entry: the same kernel on the same matrix gives the same bits on every rank.

``cross(a, b, dim)`` splits any dim but ``dim``. ``linalg_matrix_norm`` treats the two dims
named by ``dim`` as the matrix and the others as batch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from autotp.capture.torch_compat import OpOverload
from autotp.ir.placement import P, Placement, R, Shard
from autotp.ir.values import TensorMeta
from autotp.strategies.rules.pointwise import broadcast_strategies
from autotp.strategies.rules.registry import OpContext, OpStrategy, norm_dim, register

aten = __import__("torch").ops.aten

CoreFn = Callable[[tuple[TensorMeta, ...]], Sequence[int] | None]


def _fixed(*core: int) -> CoreFn:
    """Core (per-matrix) dims of each tensor input in order; inputs past the list have none
    (``atol``/``rtol`` tensors broadcast against the batch shape)."""
    return lambda metas: tuple(core[i] if i < len(core) else 0 for i in range(len(metas)))


def _solve_core(metas: tuple[TensorMeta, ...]) -> Sequence[int] | None:
    """``linalg_solve(A, B)``: B is a batch of vectors when ``B.ndim == 1`` or ``B.shape ==
    A.shape[:-1]``, else of matrices. A B of ``A.ndim - 1`` dims that is a broadcast matrix could
    turn into a vector batch once A is split (``A (12,6,6)``, ``B (6,6)`` at 2 ranks): no split."""
    a, b = metas[0], metas[1]
    if b.ndim == 1 or tuple(b.shape) == tuple(a.shape[:-1]):
        return (2, 1)
    return (2, 2) if b.ndim != a.ndim - 1 else None


def _outputs(ctx: OpContext) -> tuple[TensorMeta, ...]:
    return ctx.output if isinstance(ctx.output, tuple) else (ctx.output,)


def _batch_strategies(ctx: OpContext, core: Sequence[int]) -> Iterator[OpStrategy]:
    """Per batch dim of the broadcast batch shape: split it on every input that has it (size
    >1) and on every output; outputs must all lead with the full batch shape."""
    batches = [tuple(m.shape[: m.ndim - c]) for m, c in zip(ctx.inputs, core)]
    nb = max(len(b) for b in batches)
    batch = [max((b[d - (nb - len(b))] for b in batches if d - (nb - len(b)) >= 0), default=1) for d in range(nb)]
    outs = _outputs(ctx)
    if any(tuple(o.shape[:nb]) != tuple(batch) or o.ndim < nb for o in outs):
        return
    for d in range(nb):
        inputs: list[Placement] = []
        for b in batches:
            dk = d - (nb - len(b))
            inputs.append(Shard(dk) if dk >= 0 and b[dk] == batch[d] else R)
        yield OpStrategy(tuple(inputs), (Shard(d),) * len(outs) if isinstance(ctx.output, tuple) else Shard(d))


# op packet -> core dims of its tensor inputs
_CORE: dict[object, CoreFn] = {
    **{op: _fixed(2) for op in (
        aten.cholesky, aten.cholesky_inverse, aten.linalg_cholesky, aten.linalg_cholesky_ex,
        aten.linalg_inv, aten.linalg_inv_ex, aten.inverse, aten.linalg_det, aten._linalg_det, aten.det,
        aten.linalg_slogdet, aten._linalg_slogdet, aten.slogdet, aten.logdet,
        aten.linalg_eig, aten.linalg_eigvals, aten.linalg_eigh, aten._linalg_eigh, aten.linalg_eigvalsh,
        aten.linalg_svd, aten._linalg_svd, aten.svd, aten.linalg_svdvals, aten.linalg_qr, aten.qr, aten.geqrf,
        aten.linalg_lu, aten.linalg_lu_factor, aten.linalg_lu_factor_ex, aten._lu_with_info,
        aten.linalg_ldl_factor, aten.linalg_ldl_factor_ex, aten.linalg_matrix_exp, aten.matrix_exp,
        aten.linalg_matrix_power, aten.matrix_power, aten.linalg_cond, aten.pinverse, aten.linalg_pinv,
        aten.linalg_matrix_rank,
    )},
    **{op: _fixed(2, 2) for op in (aten.cholesky_solve, aten.triangular_solve, aten.linalg_solve_triangular)},
    **{op: _fixed(2, 1) for op in (aten.lu_unpack, aten.linalg_householder_product)},
    **{op: _fixed(2, 1, 2) for op in (aten.linalg_lu_solve, aten.linalg_ldl_solve, aten.ormqr)},
    aten.lu_solve: _fixed(2, 2, 1),
    **{op: _solve_core for op in (aten.linalg_solve, aten.linalg_solve_ex, aten._linalg_solve_ex)},
}

# op packet -> the tensor input the (first) output is linear in: a partial sum passes through there
_LINEAR_IN: dict[object, int] = {
    aten.cholesky_solve: 0, aten.triangular_solve: 0, aten.lu_solve: 0,
    aten.linalg_solve_triangular: 1, aten.linalg_solve: 1, aten.linalg_solve_ex: 1, aten._linalg_solve_ex: 1,
    aten.linalg_lu_solve: 2, aten.linalg_ldl_solve: 2, aten.ormqr: 2,
}


def _packet(ctx: OpContext) -> object:
    target = ctx.node.target
    return target.overloadpacket if isinstance(target, OpOverload) else target


@register(*_CORE)
def batched(ctx: OpContext) -> Iterator[OpStrategy]:
    packet = _packet(ctx)
    core = _CORE[packet](ctx.inputs)
    if core is None or any(m.ndim < c for m, c in zip(ctx.inputs, core)):
        return
    yield from _batch_strategies(ctx, core)
    linear = _LINEAR_IN.get(packet)
    if linear is None or linear >= len(ctx.inputs):
        return
    outs = _outputs(ctx)

    def solution(placement: Placement) -> Placement | tuple[Placement, ...]:
        """The solution's placement; the other outputs (factors, pivots, info) stay whole."""
        return (placement,) + (R,) * (len(outs) - 1) if isinstance(ctx.output, tuple) else placement

    yield OpStrategy(tuple(P if i == linear else R for i in range(len(ctx.inputs))), solution(P))
    if core[linear] == 2:
        # with the coefficients whole, a matrix right-hand side is independent columns (rows
        # when the coefficients multiply from the right, ``left=False``): split them alike
        rhs = ctx.inputs[linear]
        from_end = 1 if ctx.named_arg("left", True) else 2
        inputs = tuple(Shard(rhs.ndim - from_end) if i == linear else R for i in range(len(ctx.inputs)))
        yield OpStrategy(inputs, solution(Shard(outs[0].ndim - from_end)))


@register(aten.linalg_cross, aten.cross)
def cross(ctx: OpContext) -> Iterator[OpStrategy]:
    """Any dim but the one the product runs along. ``cross`` without ``dim`` takes the first dim
    of size 3 of its first input: a split dim before it must not become 3 on a rank."""
    ndim = ctx.inputs[0].ndim
    dim = ctx.named_arg("dim", -1 if _packet(ctx) is aten.linalg_cross else None)
    shape = ctx.inputs[0].shape
    if dim is None:
        dim = next((d for d, size in enumerate(shape) if size == 3), None)
        if dim is None:
            return
        unsafe = {d for d in range(dim) if shape[d] // ctx.tp_size == 3}
    else:
        dim, unsafe = norm_dim(dim, ndim), set()
    for strategy in broadcast_strategies(ctx):
        (split,) = (p.dim for p in strategy.outputs() if isinstance(p, Shard))
        if split != dim and split not in unsafe:
            yield strategy


@register(aten.linalg_matrix_norm)
def matrix_norm(ctx: OpContext) -> Iterator[OpStrategy]:
    """The two ``dim`` dims are the matrix; every other dim is batch, kept or dropped per ``keepdim``."""
    meta = ctx.inputs[0]
    dims = {norm_dim(d, meta.ndim) for d in ctx.named_arg("dim", (-2, -1))}
    keepdim = bool(ctx.named_arg("keepdim", False))
    batch = [d for d in range(meta.ndim) if d not in dims]
    for position, d in enumerate(batch):
        yield OpStrategy((Shard(d),), Shard(d if keepdim else position))
