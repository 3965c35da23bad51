"""Plan costs as functions of the batch size B and the sequence length T.

``torch.export`` gives static shapes, so a captured graph knows its costs at one (B, T) only.
But every node's work is a polynomial in the two: FLOPs and bytes are linear in B, and at most
quadratic in T (attention's scores are T x T). So the model is captured at a few sizes, and for
each node the FLOPs, the bytes moved and the size of every output are fitted exactly, with
rational coefficients, on the basis

    1, T, T², B, B·T, B·T²                    (1, B alone when no sequence dim is given)

from a 2 x 3 grid of (B, T), then checked at a seventh point. A plan's time is then, with the
profile's numbers for each node's roofline and each conversion's collective,

    total(B, T) = Σ_nodes  m · Max(launch + Max(F(B,T) · s_flop, N(B,T) · s_byte),
                                 class_launch + F(B,T) · class_s_flop)
                + Σ_steps  Min_algorithms(fixed + slope · N + Σ_knees extra · Max(0, N - at)),
                                                                    N = N_value(B,T)

where ``m`` is 3 for a node priced forward and backward (training) and 1 otherwise, the
second argument of the outer Max is the profile's measured floor for the node's op class (absent
when the profile has none; a view has only that floor), the knees are the link's bandwidth
knees (``cost_models.PiecewiseLinearCost``; none on a straight-line link), and a
conversion's steps are priced as ``autotp.cost.model.CostModel`` prices them: a step over mesh
axis ``a`` on its axis's link and group size, on the value as the other axes leave it
(``N_value`` over the sizes of the other axes that split it), and a node's work divided by the
product of the sizes of the axes that split it (``cost.model.work_share``). A profile whose link
has wake curves adds, per collective, its curve at the compute since the previous collective
(``autotp.cost.wake``, :class:`WakeTerm`). ``total(B0, T0)`` is
the plan's ``total_seconds + hidden_seconds``: the expression charges every collective in full,
as ``overlap=False`` does; what compute beside a collective hides (``autotp.comm.overlap``) is a
``min`` over the schedule that is not modelled here, so with overlap it is an upper bound. The expression prices *this plan's strategies* at any size; it does
not say whether tp still divides the split dims there, nor that the plan is still optimal.
That is what :func:`crossovers` finds: the batch sizes at which the optimal plan changes.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

import sympy
import torch
from torch import nn

from cost_models import HardwareProfile, OpClassRate, WakeCurve, collective_terms, matmul_roofline, roofline
from cost_models.comm import piecewise_linear_seconds
from autotp.capture.export import capture
from autotp.comm.conversions import conversion_sites, sites_by_consumer
from autotp.comm.redistribute import Step, StepKind
from autotp.cost.model import (
    _STEP_COLLECTIVE,
    BACKWARD_COMPUTE_FACTOR,
    CostModel,
    node_flops,
    node_nbytes,
    node_weight_nbytes,
    op_class,
    weight_share,
    work_share,
)
from autotp.cost.wake import collective_gaps
from autotp.errors import AutoTPError, ConfigError
from autotp.ir.placement import Placements, Shard
from autotp.ir.plan import Plan
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace, build_strategy_space

log = logging.getLogger(__name__)

B, T = sympy.symbols("B T", positive=True)

Monomial = tuple[int, int]  # (power of B, power of T)
_BASIS_BT: tuple[Monomial, ...] = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2))
_BASIS_B: tuple[Monomial, ...] = ((0, 0), (1, 0))


# ---------------------------------------------------------------------------------------------
# Polynomials in B and T


@dataclass(frozen=True, slots=True)
class Poly:
    """``Σ c · B^i · T^j`` with exact rational coefficients; ``terms`` holds ``((i, j), c)``."""

    terms: tuple[tuple[Monomial, Fraction], ...]

    def __call__(self, batch: float, seq: float) -> float:
        return float(sum(float(c) * batch**i * seq**j for (i, j), c in self.terms))

    def __mul__(self, factor: Fraction | int) -> Poly:
        return Poly(tuple((m, c * factor) for m, c in self.terms if c * factor != 0))

    def __bool__(self) -> bool:
        return bool(self.terms)

    def expr(self) -> sympy.Expr:
        return sympy.Add(*(sympy.Rational(c.numerator, c.denominator) * B**i * T**j for (i, j), c in self.terms))


def _solve(rows: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction]:
    """Exact Gaussian elimination; the sample grid makes ``rows`` invertible."""
    n = len(rhs)
    a = [row[:] + [r] for row, r in zip(rows, rhs)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if a[r][col] != 0)
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col and a[r][col] != 0:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def _fit(basis: Sequence[Monomial], points: Sequence[tuple[int, int]], values: Sequence[float]) -> Poly:
    rows = [[Fraction(b) ** i * Fraction(t) ** j for i, j in basis] for b, t in points]
    coeffs = _solve(rows, [Fraction(v) for v in values])
    return Poly(tuple((m, c) for m, c in zip(basis, coeffs) if c != 0))


# ---------------------------------------------------------------------------------------------
# Work per node, fitted from captures at a few sizes


@dataclass(frozen=True, slots=True)
class NodeWork:
    """One node's FLOPs and bytes moved (whole op, unsplit), each output's size and, for a
    contraction, its weight's size (``cost.node_weight_nbytes``), as polynomials."""

    flops: Poly
    nbytes: Poly
    outputs: dict[int | None, Poly]
    weight_nbytes: Poly = Poly(())


@dataclass(frozen=True, slots=True)
class WorkModel:
    """Fitted work of every node of a model's graph, and the graph at the planned size."""

    nodes: dict[str, NodeWork]
    space: StrategySpace  # a 1-D mesh of 1 rank: the node kinds, metas and requires_grad at (batch0, seq0)
    batch0: int
    seq0: int
    has_seq: bool


def resize_inputs(example_inputs: tuple[torch.Tensor, ...], *, batch: int, seq: int | None, batch_dim: int = 0, seq_dim: int | None = 1) -> tuple[torch.Tensor, ...]:
    """Zero-filled inputs like ``example_inputs`` with ``batch`` (and ``seq``) along those dims."""
    out = []
    for x in example_inputs:
        shape = list(x.shape)
        shape[batch_dim] = batch
        if seq is not None and seq_dim is not None:
            shape[seq_dim] = seq
        out.append(torch.zeros(shape, dtype=x.dtype, device=x.device))
    return tuple(out)


def _sample_sizes(batch0: int, seq0: int | None) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The 2 x 3 fitting grid (or 2 points without T) and one more point to check the fit."""
    batches = [batch0, batch0 + 1, batch0 + 2]
    if seq0 is None:
        return [(batches[0], 0), (batches[1], 0)], (batches[2], 0)
    seqs = [seq0 - k for k in range(4)] if seq0 >= 5 else [seq0 + k for k in range(4)]
    grid = [(b, t) for b in batches[:2] for t in seqs[:3]]
    return grid, (batches[2], seqs[3])


def _space_at(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> StrategySpace:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unsupported-op warnings were given when planning
        return build_strategy_space(capture(model, inputs), 1)


def _measure(space: StrategySpace) -> dict[str, tuple[float, float, dict[int | None, float], float]]:
    out = {}
    for node in space.nodes:
        flops = node_flops(node) if node.kind is NodeKind.OP else 0.0
        nbytes = node_nbytes(node) if node.kind is NodeKind.OP else 0.0
        metas = node.output_meta
        outputs: dict[int | None, float] = {}
        if isinstance(metas, tuple):
            outputs = {i: float(m.nbytes) for i, m in enumerate(metas)}
        elif metas is not None:
            outputs = {None: float(metas.nbytes)}
        out[node.name] = (flops, nbytes, outputs, node_weight_nbytes(node) if node.kind is NodeKind.OP else 0.0)
    return out


def fit_work(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    batch_dim: int = 0,
    seq_dim: int | None = 1,
) -> WorkModel:
    """Capture ``model`` at a few sizes around ``example_inputs`` and fit every node's work.

    Raises ``ConfigError`` when the graph changes with the size (other nodes or ops), or when
    the work is not a polynomial of degree 1 in B and 2 in T (the check point disagrees).
    """
    first = example_inputs[0]
    batch0 = int(first.shape[batch_dim])
    has_seq = seq_dim is not None and all(x.ndim > seq_dim for x in example_inputs)
    seq0 = int(first.shape[seq_dim]) if has_seq else None  # type: ignore[index]
    grid, check = _sample_sizes(batch0, seq0)
    basis = _BASIS_BT if has_seq else _BASIS_B
    spaces: dict[tuple[int, int], StrategySpace] = {}
    for b, t in [*grid, check]:
        inputs = resize_inputs(example_inputs, batch=b, seq=t if has_seq else None, batch_dim=batch_dim, seq_dim=seq_dim)
        try:
            spaces[(b, t)] = _space_at(model, inputs)
        except AutoTPError as exc:
            what = f"batch {b}" + (f" and sequence length {t} (dim {seq_dim})" if has_seq else "")
            hint = "; pass seq_dim=None if dim 1 of the inputs is not a sequence" if has_seq else ""
            raise ConfigError(f"symbolic costs need the model captured at other sizes, and capture at {what} failed: {exc}{hint}") from exc
    base = spaces[grid[0]]  # (batch0, seq0): the planned size
    names = [(n.name, n.op) for n in base.nodes]
    for size, space in spaces.items():
        other = [(n.name, n.op) for n in space.nodes]
        if other != names:
            raise ConfigError(_graph_change(names, other, (batch0, seq0), size, seq_dim if has_seq else None))
    measured = {size: _measure(space) for size, space in spaces.items()}
    nodes: dict[str, NodeWork] = {}
    for name, _ in names:
        series = [measured[p][name] for p in grid]
        flops = _fit(basis, grid, [s[0] for s in series])
        nbytes = _fit(basis, grid, [s[1] for s in series])
        outputs = {k: _fit(basis, grid, [s[2][k] for s in series]) for k in series[0][2]}
        weight = _fit(basis, grid, [s[3] for s in series])
        expected = measured[check][name]
        checks = [(flops, expected[0], "FLOPs"), (nbytes, expected[1], "bytes"), (weight, expected[3], "weight bytes"), *((outputs[k], expected[2][k], "output size") for k in outputs)]
        for poly, value, what in checks:
            if not math.isclose(poly(*check), value, rel_tol=1e-9, abs_tol=1e-6):
                raise ConfigError(
                    f"the {what} of node '{name}' are not a polynomial of degree 1 in the batch and 2 in the "
                    f"sequence length (fit predicts {poly(*check):g} at {check}, capture gives {value:g})"
                )
        nodes[name] = NodeWork(flops, nbytes, outputs, weight)
    return WorkModel(nodes=nodes, space=base, batch0=batch0, seq0=seq0 or 0, has_seq=has_seq)


def _graph_change(base: list[tuple[str, str]], other: list[tuple[str, str]], planned: tuple[int, int | None], size: tuple[int, int], seq_dim: int | None) -> str:
    """Why a fit is impossible: the first node that differs between the graphs at two sizes."""
    k = next((i for i, (a, b) in enumerate(zip(base, other)) if a != b), min(len(base), len(other)))

    def show(nodes: list[tuple[str, str]]) -> str:
        return f"'{nodes[k][0]}' ({nodes[k][1]})" if k < len(nodes) else "nothing"

    at = f"batch {size[0]}" + (f", sequence length {size[1]}" if seq_dim is not None else "")
    planned_at = f"batch {planned[0]}" + (f", sequence length {planned[1]}" if seq_dim is not None else "")
    hint = (
        "; a slice that is a no-op at the example's sequence length (pos[:t] with t the position table's size) "
        "is a common cause: use a shorter example sequence, or seq_dim=None to fit the batch size alone"
        if seq_dim is not None else ""
    )
    return (
        f"the captured graph changes with the input size, so its costs are not one expression of B and T: "
        f"node {k} is {show(base)} at {planned_at} but {show(other)} at {at}{hint}"
    )


# ---------------------------------------------------------------------------------------------
# Cost terms of one plan


@dataclass(frozen=True, slots=True)
class ComputeTerm:
    """``multiplier · Max(roofline, floor)`` with ``roofline = launch + Max(flops · seconds_per_flop,
    nbytes · seconds_per_byte)`` (0 without work) and ``floor`` the op class's measured line
    ``floor.launch_seconds + flops · floor.seconds_per_flop`` (``cost_models.op_seconds``). A
    contraction adds ``weight_nbytes · seconds_per_weight_byte``, fetching its weight
    (``cost_models.matmul_seconds``)."""

    node: str
    multiplier: float
    launch_seconds: float
    seconds_per_flop: float
    seconds_per_byte: float
    flops: Poly
    nbytes: Poly
    floor: OpClassRate | None = None
    weight_nbytes: Poly = Poly(())
    seconds_per_weight_byte: float = 0.0

    def seconds(self, batch: float, seq: float) -> float:
        flops = self.flops(batch, seq)
        roof = self.launch_seconds + max(flops * self.seconds_per_flop, self.nbytes(batch, seq) * self.seconds_per_byte) if (self.flops or self.nbytes) else 0.0
        roof += self.weight_nbytes(batch, seq) * self.seconds_per_weight_byte
        return self.multiplier * (roof if self.floor is None else max(roof, self.floor.seconds(flops)))

    def expr(self) -> sympy.Expr:
        roof: sympy.Expr = sympy.Integer(0)
        if self.flops or self.nbytes:
            roof = self.launch_seconds + sympy.Max(self.flops.expr() * self.seconds_per_flop, self.nbytes.expr() * self.seconds_per_byte)
        if self.weight_nbytes and self.seconds_per_weight_byte:
            roof += self.weight_nbytes.expr() * self.seconds_per_weight_byte
        if self.floor is not None:
            roof = sympy.Max(roof, self.floor.launch_seconds + self.flops.expr() * self.floor.seconds_per_flop)
        return self.multiplier * roof


@dataclass(frozen=True, slots=True)
class StepLine:
    """One way to run a step: ``fixed + slope · N + Σ extra · Max(0, N - at)``, N the full tensor's bytes.

    ``knees`` are ``(at, extra)`` pairs as in ``cost_models.PiecewiseLinearCost`` (the link's
    bandwidth knees in bytes of the full tensor); :meth:`seconds` is
    ``cost_models.comm.piecewise_linear_seconds``, as the planner's price is.
    """

    fixed_seconds: float
    seconds_per_byte: float
    knees: tuple[tuple[float, float], ...] = ()

    def seconds(self, size: float) -> float:
        return piecewise_linear_seconds(size, fixed=self.fixed_seconds, slope=self.seconds_per_byte, knees=self.knees)

    def expr(self, size: sympy.Expr) -> sympy.Expr:
        bends = [extra * sympy.Max(0, size - at) for at, extra in self.knees]
        return sympy.Add(self.fixed_seconds + self.seconds_per_byte * size, *bends)


@dataclass(frozen=True, slots=True)
class StepTerm:
    """One conversion step: ``Min over lines`` (:class:`StepLine`) of the tensor's bytes, 0 for an empty tensor."""

    node: str
    step: str
    lines: tuple[StepLine, ...]
    nbytes: Poly

    def seconds(self, batch: float, seq: float) -> float:
        if not (self.nbytes and self.lines):
            return 0.0
        size = self.nbytes(batch, seq)
        return min(line.seconds(size) for line in self.lines)

    def expr(self) -> sympy.Expr:
        if not (self.nbytes and self.lines):
            return sympy.Integer(0)
        size = self.nbytes.expr()
        return sympy.Min(*(line.expr(size) for line in self.lines))


@dataclass(frozen=True, slots=True)
class WakeTerm:
    """One collective's wake-up: ``curve`` at the gap ``Σ fraction · compute term`` before it (``autotp.cost.wake``).

    The curve is linear between its measured gaps and flat outside them, so its expression is
    ``Σ_segments slope · (Min(Max(gap, from), to) - from)``.
    """

    node: str
    step: str
    curve: WakeCurve
    gap: tuple[tuple[ComputeTerm, float], ...]

    def seconds(self, batch: float, seq: float) -> float:
        return self.curve.seconds(sum(fraction * term.seconds(batch, seq) for term, fraction in self.gap))

    def expr(self) -> sympy.Expr:
        gap = sympy.Add(*(fraction * term.expr() for term, fraction in self.gap))
        return sympy.Add(*(slope * (sympy.Min(sympy.Max(gap, start), end) - start) for start, end, slope in self.curve.segments() if slope))


CostTerm = ComputeTerm | StepTerm | WakeTerm


def _step_lines(step: Step, cost: CostModel) -> tuple[StepLine, ...]:
    """The ways to run ``step`` over its mesh axis's groups (``mesh.shape[step.axis]`` ranks, on that axis's link)."""
    rates = roofline(cost.profile)
    group_size = cost.mesh.shape[step.axis]
    if step.kind is StepKind.LOCAL_CHUNK:  # copies this rank's chunk: 2·B/group bytes
        return (StepLine(rates.launch_seconds, 2 * rates.seconds_per_byte / group_size),)
    if step.kind is StepKind.TO_PARTIAL:
        return (StepLine(rates.launch_seconds, rates.seconds_per_byte),)
    curves = collective_terms(cost.axis_link(step.axis), _STEP_COLLECTIVE[step.kind], group_size=group_size)
    return tuple(StepLine(c.fixed_seconds, c.seconds_per_byte, c.knees) for c in curves)


def _other_axes_share(placements: Placements, axis: int, mesh_shape: tuple[int, ...]) -> int:
    """Into how many pieces the axes other than ``axis`` split a value placed as ``placements``:
    a step on ``axis`` moves one of them (``CostModel.axis_meta``)."""
    return math.prod(size for a, (p, size) in enumerate(zip(placements, mesh_shape)) if a != axis and isinstance(p, Shard))


def cost_terms(plan: Plan, work: WorkModel, cost: CostModel) -> tuple[CostTerm, ...]:
    """The terms that sum to ``plan``'s time at any (B, T), priced by ``cost`` as the planner does."""
    spaces = work.space.by_name()
    sites = sites_by_consumer(conversion_sites(work.space, {n.name: n.strategy for n in plan.nodes}, training=cost.training))
    terms: list[CostTerm] = []
    for node in plan.nodes:
        space: NodeSpace = spaces[node.name]
        kind = op_class(space) if node.kind is NodeKind.OP else None
        floor = cost.profile.op_classes.get(kind) if kind is not None else None
        if node.kind is NodeKind.OP and (not space.is_view or floor is not None):
            share = work_share(node.strategy, cost.mesh.shape)
            dtype = str(space.slot_metas[0].dtype if space.slot_metas else torch.float32).removeprefix("torch.")
            rates = matmul_roofline(cost.profile, dtype) if kind is None else roofline(cost.profile, dtype)
            node_work = work.nodes[node.name]
            multiplier = 1 + BACKWARD_COMPUTE_FACTOR if cost.training and space.requires_grad else 1
            flops, nbytes = (Poly(()), Poly(())) if space.is_view else (node_work.flops * Fraction(1, share), node_work.nbytes * Fraction(1, share))
            weight_rate = cost.profile.matmul_weight_bytes_per_s
            terms.append(ComputeTerm(
                node.name, float(multiplier), rates.launch_seconds, rates.seconds_per_flop, rates.seconds_per_byte,
                flops, nbytes, floor,
                node_work.weight_nbytes * Fraction(1, weight_share(space, node.strategy, cost.mesh.shape)), 0.0 if weight_rate is None else 1.0 / weight_rate,
            ))
        for site in sites.get(node.name, ()):
            size = work.nodes[site.value.node].outputs[site.value.index]
            terms += [
                StepTerm(node.name, str(step), _step_lines(step, cost), size * Fraction(1, _other_axes_share(placements, step.axis, cost.mesh.shape)))
                for step, placements in site.priced_steps
            ]
    if cost.prices_wake:
        compute = {t.node: t for t in terms if isinstance(t, ComputeTerm)}
        for gap in collective_gaps(plan.nodes, work.space, training=cost.training):
            curve = cost.wake_curve(gap.step)
            if curve is not None:
                parts = tuple((compute[name], fraction) for name, fraction in gap.compute if name in compute)
                terms.append(WakeTerm(plan.nodes[gap.conversion[0]].name, str(gap.step), curve, parts))
    return tuple(terms)


def terms_seconds(terms: Sequence[CostTerm], batch: float, seq: float) -> float:
    """The total of ``terms`` at one size, numerically (what ``expression(...).subs`` gives)."""
    return sum(t.seconds(batch, seq) for t in terms)


def expression(plan: Plan) -> sympy.Expr:
    """``plan``'s total time as a sympy expression in ``B`` and ``T`` (see the module docstring)."""
    terms = plan.cost_terms
    if terms is None:
        raise ConfigError(
            "this plan carries no symbolic cost terms: make it with autotp.plan(..., symbolic=True), "
            "or attach them with autotp.cost.symbolic.attach_cost_terms(plan, model, example_inputs)"
        )
    return sympy.Add(*(t.expr() for t in terms))


def attach_cost_terms(
    plan: Plan,
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    hardware: str | HardwareProfile | None = None,
    batch_dim: int = 0,
    seq_dim: int | None = 1,
    work: WorkModel | None = None,
) -> Plan:
    """``plan`` with the cost terms ``plan.cost_expression()`` reads (made for this model and inputs).

    ``hardware`` defaults to the plan's profile name; pass the profile (or its path) when the
    plan was made from a profile file.
    """
    from autotp.cost.model import resolve_hardware

    profile = resolve_hardware(hardware if hardware is not None else plan.hardware)
    cost = CostModel(profile, plan.mesh, training=plan.training, optimizer=plan.optimizer)
    work = work or fit_work(model, example_inputs, batch_dim=batch_dim, seq_dim=seq_dim)
    return replace(plan, cost_terms=cost_terms(plan, work, cost))
