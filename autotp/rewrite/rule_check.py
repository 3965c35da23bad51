"""Brute-force check of sharding rules in one process: shard, run per rank, reassemble, compare.

For one node of a captured graph and one of its strategies on a mesh (``mesh_shape``; ``tp_size``
ranks is the 1-D mesh ``(tp_size,)``), every rank, named by its mesh coordinate ``c``, gets its
local inputs per placement, one mesh axis ``a`` at a time::

    R     the whole tensor
    S(d)  chunk c[a] of tensor.chunk(mesh_shape[a], d)   (``autotp.ir.placement.local_chunk``)
    P     a random summand: along axis a, ranks 1.. draw noise, rank 0 holds the rest (they add up)

runs the op as the rewriter does (``local_call``: shape arguments localised axis by axis where
an axis splits the output, then called through the overload packet), and checks each rank's
output against the unsharded one::

    R     every rank along the axis holds the same
    S(d)  the rank at c[a] holds chunk c[a] along d
    P     the outputs summed over the axis give the result

On an N-D mesh every combined strategy the engine offers is checked (``MeshStrategy``: one rule
answer per axis), which tests the engine's product of the rules' answers as much as the rules.
A rule that only lists correct strategies passes for every input; a wrong one fails on almost any
random input, so use non-degenerate values (a zero bias hides a bias added once per rank). Ops
that draw random numbers or return uninitialised memory are checked for shape and dtype only.
Tolerances are for float32 (a few rounding units for half and bfloat16 outputs). NaN equals NaN
and infinities must sit at the same places; a P input's inf and NaN elements stay whole on rank 0.
Complex tensors may be P, as the engine allows. A Python scalar output (``aten.item``) is R: every
rank must return the same value. Nodes holding sparse tensors are skipped (``NodeCheck.skipped``).
Node values are recorded by value and every rank gets its own copy of its inputs, so in-place ops
are checked like the others.

    values = node_values(captured, model, inputs)
    checked, failures = check_graph(captured, values, tp_size=3)            # failures == [] when all hold
    checked, failures = check_graph(captured, values, mesh_shape=(2, 3))    # every combined strategy
"""
from __future__ import annotations

import itertools
import operator
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from autotp.capture.export import CapturedGraph, InputRole
from autotp.capture.torch_compat import OpOverload, op_schema, pytree
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import Partial, Placements, Replicate, Shard, format_placements, local_chunk
from autotp.ir.strategy import MeshStrategy, one_axis
from autotp.rewrite.rewriter import local_call
from autotp.strategies.engine import (
    NodeKind,
    NodeSpace,
    StrategySpace,
    ValueRef,
    build_strategy_space,
)
from autotp.strategies.rules.registry import OpStrategy, Rule, lookup

aten = torch.ops.aten

# float32 tolerances. Rounding in a P decomposition scales with the tensor's magnitude, so ``ATOL``
# is relative to the largest element (when that exceeds 1).
ATOL = 1e-5
RTOL = 1e-4


@dataclass(frozen=True, slots=True)
class RuleFailure:
    """One strategy of one node that does not reproduce the unsharded result."""

    node: str
    op: str
    strategy: MeshStrategy
    mesh_shape: tuple[int, ...]
    reason: str

    def __str__(self) -> str:
        where = f"{self.mesh_shape[0]} ranks" if len(self.mesh_shape) == 1 else f"mesh {self.mesh_shape}"
        return f"{self.node} ({self.op}) {self.strategy} on {where}: {self.reason}"


def node_values(captured: CapturedGraph, model: nn.Module, inputs: Sequence[Any]) -> dict[str, Any]:
    """The value of every node of ``captured`` when run on ``model``'s state and ``inputs``."""
    user_inputs = iter(pytree.tree_leaves(tuple(inputs)))
    flat: list[Any] = []
    for gi in captured.inputs:
        if gi.role is InputRole.USER_INPUT:
            flat.append(next(user_inputs))
        elif gi.role is InputRole.CONSTANT:
            flat.append(captured.constants[gi.node_name])
        else:
            owner, _, name = gi.fqns[0].rpartition(".")
            flat.append(getattr(model.get_submodule(owner) if owner else model, name).detach())
    values: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            values[n.name] = _snapshot(result)
            return result

    with torch.no_grad():
        _Recorder(captured.graph_module).run(*flat)
    return values


def _snapshot(value: Any) -> Any:
    """``value`` by value: a later in-place op in the graph (``add_``, ``copy_``) would otherwise
    change the recorded input or output of an earlier node."""
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


@dataclass(frozen=True, slots=True)
class NodeCheck:
    """What checking one op node found: how many strategies ran, which failed, and, when none could
    run, why (``skipped``)."""

    node: str
    op: str
    checked: int
    failures: tuple[RuleFailure, ...]
    skipped: str | None = None


def check_graph(
    captured: CapturedGraph,
    values: Mapping[str, Any],
    *,
    mesh_shape: Sequence[int] | None = None,
    tp_size: int | None = None,
    seed: int = 0,
    max_per_node: int | None = None,
) -> tuple[int, list[RuleFailure]]:
    """Check every strategy of every op node on a mesh of ``mesh_shape`` (``tp_size``: a 1-D
    mesh of that many ranks), but those run by a rule's ``local_impl`` on any axis, which
    communicate and so need real ranks.

    ``max_per_node`` caps the strategies checked per node (N-D products grow fast): the
    all-replicate one and a sample of the rest, the same for the same ``seed``.

    Returns the number of (node, strategy) cases checked and the failures among them; nodes that
    cannot be checked (``check_node``'s ``skipped``) count as none.
    """
    shape = _mesh_shape(mesh_shape, tp_size)
    space = build_strategy_space(captured, MeshSpec.of(shape))
    results = check_nodes(captured, space, values, seed=seed, max_per_node=max_per_node)
    return sum(r.checked for r in results), [f for r in results for f in r.failures]


def check_nodes(
    captured: CapturedGraph, space: StrategySpace, values: Mapping[str, Any], *, seed: int = 0, max_per_node: int | None = None,
) -> list[NodeCheck]:
    """``check_graph`` on an already built ``space``, one ``NodeCheck`` per op node (for callers
    that count per op, like the OpInfo conformance run ``autotp.testing.opinfo``)."""
    nodes = {n.name: n for n in captured.graph_module.graph.nodes}
    generator = torch.Generator().manual_seed(seed)
    sampler = random.Random(seed)
    return [
        check_node(nodes[ns.name], ns, values, mesh_shape=space.mesh.shape, generator=generator, sampler=sampler, max_per_node=max_per_node)
        for ns in space.nodes if ns.kind is NodeKind.OP
    ]


def check_node(
    node: fx.Node,
    space: NodeSpace,
    values: Mapping[str, Any],
    *,
    mesh_shape: tuple[int, ...],
    generator: torch.Generator,
    max_per_node: int | None = None,
    sampler: random.Random | None = None,
) -> NodeCheck:
    """Every strategy of one op node (see ``check_graph``); ``sampler`` picks the ones checked
    when ``max_per_node`` caps them (default: seeded with 0)."""
    skipped = uncheckable(node, space, values)
    if skipped is not None:
        return NodeCheck(space.name, space.op, 0, (), skipped)
    rule = lookup(node.target)
    strategies = [s for s in space.strategies if not _runs_local_impl(rule, s)]  # checked on real ranks (tests/test_vocab_parallel.py)
    if max_per_node is not None and len(strategies) > max_per_node:
        picked = (sampler or random.Random(0)).sample(strategies[1:], max_per_node - 1)
        strategies = strategies[:1] + sorted(picked, key=strategies.index)
    failures = []
    for strategy in strategies:
        reason = check_strategy(node, space, strategy, values, mesh_shape=mesh_shape, generator=generator)
        if reason is not None:
            failures.append(RuleFailure(space.name, space.op, strategy, mesh_shape, reason))
    return NodeCheck(space.name, space.op, len(strategies), tuple(failures))


def uncheckable(node: fx.Node, space: NodeSpace, values: Mapping[str, Any]) -> str | None:
    """Why ``node`` cannot be checked by splitting dense tensors, or None: sparse tensors have no
    chunks to hand out (autotp keeps them replicated)."""
    outs = values[node.name]
    for value in (*(_value(values, ref) for ref in space.slots), *(outs if isinstance(outs, (tuple, list)) else (outs,))):
        if isinstance(value, torch.Tensor) and value.layout is not torch.strided:
            return f"holds a {value.layout} tensor (only dense tensors are split)"
    return None


def _mesh_shape(mesh_shape: Sequence[int] | None, tp_size: int | None) -> tuple[int, ...]:
    if (mesh_shape is None) == (tp_size is None):
        raise TypeError("pass one of mesh_shape= and tp_size=")
    return tuple(mesh_shape) if mesh_shape is not None else (tp_size,)  # type: ignore[return-value]


def _runs_local_impl(rule: Rule | None, strategy: MeshStrategy) -> bool:
    return rule is not None and rule.local_impl is not None and any(rule.local_impl(s) is not None for s in strategy.axes)


def check_strategy(
    node: fx.Node,
    space: NodeSpace,
    strategy: MeshStrategy | OpStrategy,
    values: Mapping[str, Any],
    *,
    mesh_shape: Sequence[int] | None = None,
    tp_size: int | None = None,
    generator: torch.Generator,
) -> str | None:
    """``None`` when ``strategy`` of ``node`` reproduces ``values[node.name]`` on a mesh of
    ``mesh_shape`` (``tp_size``: 1-D; an ``OpStrategy`` is a 1-D strategy), else what differs."""
    shape = _mesh_shape(mesh_shape, tp_size)
    if isinstance(strategy, OpStrategy):
        strategy = one_axis(strategy)
    if strategy.ndim not in (0, len(shape)):
        raise ValueError(f"{strategy} has {strategy.ndim} mesh axes, the mesh {shape} has {len(shape)}")
    slot_values = [_value(values, ref) for ref in space.slots]
    for k, (value, placements) in enumerate(zip(slot_values, strategy.inputs)):
        if any(isinstance(p, Partial) for p in placements) and not _summable(value):
            return f"input {k} is {value.dtype} but placed P (only R or S make sense for integers and booleans)"
    expected = values[node.name]
    expected_outs = tuple(expected) if isinstance(expected, (tuple, list)) else (expected,)
    for k, (value, placements) in enumerate(zip(expected_outs, strategy.outputs)):
        if any(isinstance(p, Partial) for p in placements) and not _summable(value):
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            return f"output {k} is {kind} but placed P (only R or S make sense for integers, booleans and Python scalars)"
    coordinates = list(itertools.product(*(range(n) for n in shape)))
    local_inputs = [_split(v, p, shape, generator) for v, p in zip(slot_values, strategy.inputs)]
    rule = lookup(node.target)
    per_rank: list[tuple[Any, ...]] = []
    for coordinate in coordinates:
        try:
            out = _run_local(node, rule, space, strategy, [s[coordinate] for s in local_inputs], values, coordinate=coordinate, mesh_shape=shape)
        except Exception as exc:  # noqa: BLE001 -- any error means the local op cannot run as the strategy says
            return f"rank {_rank_name(coordinate)} raised {type(exc).__name__}: {_first_line(exc)}"
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(expected_outs):
            return f"rank {_rank_name(coordinate)} returned {len(outs)} outputs, expected {len(expected_outs)}"
        per_rank.append(outs)
    exact = values_comparable(node)
    for k, (want, placements) in enumerate(zip(expected_outs, strategy.outputs)):
        got = dict(zip(coordinates, (outs[k] for outs in per_rank)))
        reason = _compare(want, placements, got, mesh_shape=shape, exact=exact)
        if reason is not None:
            return f"output {k} ({format_placements(placements)}): {reason}"
    return None


def _summable(value: Any) -> bool:
    """Whether partial sums of ``value`` exist: floating or complex tensors, as the engine's
    ``_fits`` allows P."""
    return isinstance(value, torch.Tensor) and (value.dtype.is_floating_point or value.dtype.is_complex)


def _value(values: Mapping[str, Any], ref: ValueRef) -> torch.Tensor:
    value = values[ref.node]
    return value if ref.index is None else value[ref.index]


def _rank_name(coordinate: tuple[int, ...]) -> str:
    return str(coordinate[0]) if len(coordinate) == 1 else str(coordinate)


def _split(value: torch.Tensor, placements: Placements, mesh_shape: tuple[int, ...], generator: torch.Generator) -> dict[tuple[int, ...], torch.Tensor]:
    """Every rank's local tensor for ``placements``, by mesh coordinate, applied one axis at a time::

        S(d) on axis a   chunk coordinate[a] of mesh_shape[a] along d (contiguous, as ``local_chunk`` makes it)
        P    on axis a   a random summand: along axis a, coordinate 1.. draw noise, 0 holds the rest
        R                all of it

    Every rank gets its own copy: an in-place op on one rank must not reach another rank's input
    or the recorded ``values``. Noise is complex for a complex tensor and scaled by the finite
    elements only; rank 0 holds an inf or NaN element whole (``inf - noise`` is ``inf``) while the
    other ranks hold noise there too, as a real partial sum would: an op that drops a NaN from one
    summand (``nansum``) then fails, as it should.

    The ranks that differ only in axis ``a``'s coordinate hold the same tensor before axis ``a``
    is applied, so a P on ``a`` splits that tensor into summands that add up over ``a``.
    """
    held: dict[tuple[int, ...], torch.Tensor] = {(): value}  # by the coordinates of the axes applied so far
    for axis, p in enumerate(placements):
        size = mesh_shape[axis]
        nxt: dict[tuple[int, ...], torch.Tensor] = {}
        for prefix, tensor in held.items():
            if isinstance(p, Shard):
                if tensor.shape[p.dim] % size:
                    raise ValueError(f"{format_placements(placements)}: dim {p.dim} of {tuple(tensor.shape)} does not split into {size} on axis {axis}")
                parts = [c.clone(memory_format=torch.contiguous_format) for c in tensor.chunk(size, p.dim)]
            elif isinstance(p, Partial):
                finite = torch.isfinite(tensor)
                scale = float(tensor[finite].abs().mean()) if bool(finite.any()) else 0.0
                noise = [torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * (scale or 1.0) for _ in range(size - 1)]
                parts = [tensor - sum(noise, torch.zeros_like(tensor))] + noise
            else:
                parts = [tensor.clone() for _ in range(size)]
            nxt.update(((*prefix, c), part) for c, part in enumerate(parts))
        held = nxt
    return held


def _run_local(
    node: fx.Node,
    rule: Rule | None,
    space: NodeSpace,
    strategy: MeshStrategy,
    inputs: list[torch.Tensor],
    values: Mapping[str, Any],
    *,
    coordinate: tuple[int, ...],
    mesh_shape: tuple[int, ...],
) -> Any:
    """The op on the rank at ``coordinate``, called the way ``autotp.rewrite.rewriter`` emits it.

    Metadata-only arguments (``rule.metadata_args``) get the whole tensor: only its dtype counts.
    """
    if node.target is operator.getitem and inputs:
        return inputs[0]  # the rewriter forwards the chosen output of the producer
    target, args, kwargs = local_call(node, rule, space, strategy, inputs, values, coordinate=coordinate, mesh_shape=mesh_shape)
    with torch.no_grad():
        return target(*args, **kwargs)


def values_comparable(node: fx.Node) -> bool:
    """False for ops whose values cannot be compared: random draws and uninitialised memory.

    Dropout in eval mode (or with p = 0) and attention without dropout are deterministic although
    their schemas are tagged ``nondeterministic_seeded``.
    """
    target = node.target
    if not isinstance(target, OpOverload):
        return True
    packet = target.overloadpacket
    if packet in (aten.dropout, aten.native_dropout, aten.feature_dropout, aten.alpha_dropout):
        return _named_arg(node, "train") is False or _named_arg(node, "p") == 0
    if packet is aten.scaled_dot_product_attention:
        return _named_arg(node, "dropout_p", 0.0) == 0
    return torch.Tag.nondeterministic_seeded not in target.tags and "empty" not in packet.__name__


def _named_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    for index, argument in enumerate(op_schema(node.target).arguments):  # type: ignore[union-attr]
        if argument.name == name:
            return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)
    return default


def _compare(
    want: torch.Tensor, placements: Placements, got: Mapping[tuple[int, ...], Any], *, mesh_shape: tuple[int, ...], exact: bool
) -> str | None:
    """Why the ranks' outputs ``got`` (by mesh coordinate) are not ``want`` laid out as ``placements``
    (``None`` if they are): each rank holds its chunk of the S axes, and the ranks that differ only
    in the coordinates of the P axes add up to it (R axes: every rank holds it). A Python scalar
    (``aten.item``, a symbolic size) is R: every rank holds the same value."""
    if not isinstance(want, torch.Tensor):
        return _compare_scalar(want, placements, got, exact=exact)
    for axis, p in enumerate(placements):
        if isinstance(p, Shard) and p.dim >= want.ndim:
            return f"the output has {want.ndim} dims (S({p.dim}) on axis {axis})"
    chunks = {c: local_chunk(want, placements, mesh_shape, c) for c in got}
    for coordinate, local in got.items():
        chunk = chunks[coordinate]
        if not isinstance(local, torch.Tensor):
            return f"rank {_rank_name(coordinate)} returned {type(local).__name__}, not a tensor"
        if local.shape != chunk.shape or local.dtype != chunk.dtype:
            return f"rank {_rank_name(coordinate)} has {tuple(local.shape)} {local.dtype}, expected {tuple(chunk.shape)} {chunk.dtype}"
    if not exact:
        return None
    partial_axes = [a for a, p in enumerate(placements) if isinstance(p, Partial)]
    groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}  # coordinate with the P axes' zeroed -> its group
    for coordinate in got:
        key = tuple(0 if a in partial_axes else c for a, c in enumerate(coordinate))
        groups.setdefault(key, []).append(coordinate)
    for key, members in groups.items():
        total = torch.stack([got[c] for c in members]).sum(0) if partial_axes else got[key]
        if not _close(total, chunks[key]):
            if partial_axes:
                over = " and ".join(str(a) for a in partial_axes)
                return f"the ranks at {_rank_name(key)} summed over axis {over} add up to a different tensor ({_diff(total, chunks[key])})"
            return f"rank {_rank_name(key)} differs from the unsharded result ({_diff(total, chunks[key])})"
    return None


def _compare_scalar(want: Any, placements: Placements, got: Mapping[tuple[int, ...], Any], *, exact: bool) -> str | None:
    if any(p != Replicate() for p in placements):
        return f"a {type(want).__name__} output can only be replicated"
    for coordinate, local in got.items():
        if isinstance(local, torch.Tensor) or type(local) is not type(want):
            return f"rank {_rank_name(coordinate)} returned {type(local).__name__}, expected {type(want).__name__}"
        if exact and not _close(torch.tensor(local), torch.tensor(want)):
            return f"rank {_rank_name(coordinate)} returned {local!r}, expected {want!r}"
    return None


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to rounding: NaN equals NaN, infinities must sit at the same places."""
    if want.dtype.is_floating_point or want.dtype.is_complex:
        finite = want[torch.isfinite(want)]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        atol, rtol = _tolerances(want.dtype)
        return torch.allclose(got, want, atol=atol * scale, rtol=rtol, equal_nan=True)
    return torch.equal(got, want)


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(ATOL, RTOL) for float32 and wider; for half and bfloat16 a few units of their rounding:
    a P summand cast down rounds on every rank before the sum (``aten.to`` of a P tensor)."""
    eps = torch.finfo(dtype).eps
    if eps <= torch.finfo(torch.float32).eps:
        return ATOL, RTOL
    return 4 * eps, 4 * eps


def _diff(got: torch.Tensor, want: torch.Tensor) -> str:
    if not (want.dtype.is_floating_point or want.dtype.is_complex):
        return f"{int((got != want).sum())} of {want.numel()} elements differ"
    finite = torch.isfinite(want) & torch.isfinite(got)
    err = (got - want)[finite].abs().max() if finite.any() else torch.tensor(float("nan"))
    return f"max abs error {float(err):.3g}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
