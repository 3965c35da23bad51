"""``autotp.verify``: run a model sharded on local CPU ranks and unsharded here, and compare.

The sharded run is the real thing: ``autotp.parallelize`` on ``prod(mesh_shape)`` gloo processes
(``autotp.testing.run_on_ranks``, which always tears them down and bounds them by a timeout).
The reference runs in this process on a copy of the model. Compared, tensor by tensor:

    outputs      every output leaf of every rank against the original's
    input grads  (training) of every floating example input, on every rank
    gradients    (training) of a fixed random projection of the outputs: every rank's local
                 gradient against its chunk of the original's, ``local_chunk(full, placements,
                 mesh_shape, coordinate)`` (the inverse of how ``parallelize`` split the
                 parameter: ``S(d)`` on axis ``a`` takes chunk ``coordinate[a]`` along ``d``;
                 ``R`` all of it, so every replica is compared)
    parameters   (training) after one AdamW step on both models

A tensor passes when ``max |sharded - original| <= rtol * scale``, where ``scale`` is the
original's ``max |x|``, floored at ``1e-2`` of the largest such value of its kind (a gradient that
is exactly zero in exact arithmetic, such as a key bias under softmax, is rounding noise on both
sides). ``rtol`` depends on the dtype (``TOLERANCES``): reordered sums differ by a few ulps per
accumulated term, and the check must not pass a wrong split hidden in that noise.
"""
from __future__ import annotations

import copy
import logging
import math
import pickle
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from autotp.capture.torch_compat import pytree
from autotp.errors import ConfigError, InfeasiblePlanError
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import Placements, Replicate, Shard, format_placements, local_chunk
from autotp.ir.plan import Plan
from autotp.runtime.arguments import example_input_names

log = logging.getLogger(__name__)

# Relative tolerance per dtype: fp32 sums reordered across ranks differ by ~1e-6 of their scale
# at these sizes; 1e-4 leaves room for deeper models. bf16 keeps 8 mantissa bits (2**-8 = 4e-3
# per rounding, compounded across layers), fp16 11 bits.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
SCALE_FLOOR = 1e-2  # of the largest reference magnitude of the same kind (see the module docstring)
# One AdamW step of lr 1e-2 moves a parameter of magnitude ~0.05 by up to 20%: any gradient that
# differs shows. Its eps is the largest gradient magnitude of the original (``adam_eps``): Adam's
# first step is ``lr * g / (|g| + eps)``, which a tiny eps turns into a +-lr step of random sign for
# a gradient that is rounding noise on both sides; at this eps the step is smooth in ``g``.
ADAMW_LR = 1e-2

GraphHook = Callable[[fx.GraphModule, int], None]


@dataclass(frozen=True, slots=True)
class Comparison:
    """One tensor of the sharded run against the original's."""

    kind: str  # "output", "input gradient", "gradient" or "parameter"
    name: str
    dtype: str
    placement: str  # of the parameter in the plan; "" for outputs
    max_abs: float
    max_rel: float  # max_abs / scale
    rtol: float
    problem: str = ""  # why it cannot be compared (a missing gradient, another shape), else ""

    @property
    def passed(self) -> bool:
        return not self.problem and self.max_rel <= self.rtol


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``verify`` compared and found; ``str()`` is a short table, ``passed`` the verdict."""

    model_name: str
    tp_size: int  # all ranks of the mesh
    training: bool
    comparisons: tuple[Comparison, ...]
    collectives: tuple[Mapping[str, int], ...]  # per rank: collective kind -> count in its graph
    split_parameters: int
    parameters: int
    local_elements: tuple[int, ...]  # parameter elements each rank holds
    full_elements: int
    seconds: float
    error: str | None = None  # a rank failed (raised, hung or died): the check fails
    notes: tuple[str, ...] = field(default=())
    mesh: MeshSpec | None = None  # the mesh the ranks ran as; None: the 1-D mesh of tp_size ranks
    placements: tuple[tuple[str, str], ...] = ()  # (parameter, its placements as format_placements writes them)
    split_per_axis: tuple[int, ...] = ()  # parameters split over each mesh axis

    @property
    def trivial(self) -> bool:
        """The plan splits no parameter and runs no collective: sharded and original are the same program."""
        return self.error is None and self.split_parameters == 0 and not any(self.collectives)

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.comparisons)

    def failures(self) -> tuple[Comparison, ...]:
        return tuple(c for c in self.comparisons if not c.passed)

    def __str__(self) -> str:
        return _format(self)


def verify(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    mesh_shape: Sequence[int] | None = None,
    mesh_axis_names: Sequence[str] | None = None,
    axis_roles: Mapping[int | str, str] | None = None,
    inter_node_axes: Sequence[int | str] | None = None,
    plan: Plan | None = None,
    training: bool = True,
    memory_budget: int | str | None = None,
    hardware: str | None = None,
    optimizer: str | None = "adamw",
    timeout_seconds: float = 300.0,
    graph_hook: GraphHook | None = None,
) -> VerifyReport:
    """Run ``model`` sharded on ``prod(mesh_shape)`` local gloo ranks and unsharded here; compare.

    The ranks form ``init_device_mesh("cpu", mesh_shape, mesh_dim_names=...)``: ``mesh_shape``
    may have any number of axes (``(2, 2)``: 4 ranks), named ``mesh_axis_names`` (as in
    ``autotp.plan``); it defaults to the plan's mesh, or ``(2,)`` without a plan.
    ``plan=None`` plans once here (ranks then apply that plan) with ``memory_budget``, which
    defaults to 1.3/N of the replicated model's state (N: all ranks), as ``autotp plan`` does for
    the built-in examples: without a budget the planner may keep everything whole, and a plan that
    splits nothing is trivially equal (the report then says so). ``axis_roles`` and
    ``inter_node_axes`` are ``autotp.plan``'s. ``training`` also compares gradients
    and the parameters after one AdamW step. ``graph_hook(graph_module, rank)`` is called on every
    rank's rewritten graph before it runs (for instrumenting, or for testing ``verify`` itself by
    injecting a rewrite bug); it must be a module-level function, as it is pickled to the ranks.
    The model must be picklable and deterministic (call ``model.eval()`` to turn dropout off).
    """
    return verify_source(
        PickledModel(_pickle_model(model)), model, example_inputs, mesh_shape=mesh_shape, mesh_axis_names=mesh_axis_names,
        axis_roles=axis_roles, inter_node_axes=inter_node_axes, plan=plan, training=training, memory_budget=memory_budget,
        hardware=hardware, optimizer=optimizer, timeout_seconds=timeout_seconds, graph_hook=graph_hook,
    )


@dataclass(frozen=True, slots=True)
class PickledModel:
    """The model pickled whole, for ranks that can import its classes (``verify``)."""

    data: bytes

    def build(self) -> nn.Module:
        return pickle.loads(self.data)


@dataclass(frozen=True, slots=True)
class RebuiltModel:
    """A model the ranks rebuild with ``build`` (a module-level callable) and load ``state`` into:
    for CLI targets from a file, whose classes a spawned rank cannot import by name."""

    build_fn: Callable[..., nn.Module]
    args: tuple[Any, ...]
    state: Mapping[str, torch.Tensor]

    def build(self) -> nn.Module:
        model = self.build_fn(*self.args)
        model.load_state_dict(dict(self.state))
        return model


def verify_source(
    source: PickledModel | RebuiltModel,
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    mesh_shape: Sequence[int] | None,
    plan: Plan | None,
    training: bool,
    memory_budget: int | str | None,
    hardware: str | None,
    optimizer: str | None,
    timeout_seconds: float,
    graph_hook: GraphHook | None,
    mesh_axis_names: Sequence[str] | None = None,
    axis_roles: Mapping[int | str, str] | None = None,
    inter_node_axes: Sequence[int | str] | None = None,
) -> VerifyReport:
    """``verify`` with the ranks' copy of the model given by ``source`` (see ``RebuiltModel``)."""
    from autotp.api import _apply_plan
    from autotp.testing import RankError, run_on_ranks

    mesh = _mesh(mesh_shape, plan, mesh_axis_names, inter_node_axes)
    _check_real(model, example_inputs)
    started = time.perf_counter()
    notes: list[str] = []
    if plan is None:
        plan, note = _plan(
            model, example_inputs, mesh, axis_roles=axis_roles, training=training, memory_budget=memory_budget, hardware=hardware, optimizer=optimizer,
        )
        notes += [note] if note else []
    else:
        _apply_plan(model, example_inputs, plan, mesh)  # a plan for another model fails here, typed, not in a rank
    reference = _run(copy.deepcopy(model), example_inputs, training=training, adam_eps=None)
    try:
        ranks = run_on_ranks(
            verify_rank, mesh.size, source, example_inputs, plan, training, reference.adam_eps, graph_hook, timeout_seconds=timeout_seconds,
        )
    except RankError as exc:
        return VerifyReport(
            type(model).__name__, mesh.size, training, (), (), 0, len(list(model.parameters())), (), _elements(model),
            time.perf_counter() - started, error=str(exc), notes=tuple(notes), mesh=mesh,
        )
    names = [name for name, _ in model.named_parameters()]
    comparisons = _compare(reference, ranks, names, example_input_names(model.forward, len(example_inputs)), mesh_shape=mesh.shape, training=training)
    placements = {n: ranks[0].placements.get(n, (Replicate(),) * mesh.ndim) for n in names}
    return VerifyReport(
        model_name=type(model).__name__,
        tp_size=mesh.size,
        training=training,
        comparisons=comparisons,
        collectives=tuple(r.collectives for r in ranks),
        split_parameters=sum(any(isinstance(p, Shard) for p in placements[n]) for n in names),
        parameters=len(list(model.parameters())),
        local_elements=tuple(r.local_elements for r in ranks),
        full_elements=_elements(model),
        seconds=time.perf_counter() - started,
        notes=tuple(notes),
        mesh=mesh,
        placements=tuple((n, format_placements(placements[n])) for n in names),
        split_per_axis=tuple(sum(isinstance(placements[n][a], Shard) for n in names) for a in range(mesh.ndim)),
    )


def _mesh(
    mesh_shape: Sequence[int] | None, plan: Plan | None, names: Sequence[str] | None, inter_node_axes: Sequence[int | str] | None,
) -> MeshSpec:
    """The mesh the ranks form: ``mesh_shape`` (default: the plan's, else ``(2,)``); a given plan's
    axis names unless ``names`` says otherwise, which must then agree with the plan."""
    if plan is None:
        return MeshSpec.of(tuple(mesh_shape) if mesh_shape is not None else (2,), names, inter_node_axes=inter_node_axes)
    planned = plan.mesh
    shape = tuple(mesh_shape) if mesh_shape is not None else planned.shape
    if shape != planned.shape:
        if len(planned.shape) == 1 and len(shape) == 1:
            raise ConfigError(f"the plan was made for {planned.size} ranks but mesh_shape {shape} has {math.prod(shape)}; pass mesh_shape=({planned.size},)")
        raise ConfigError(f"the plan was made for the mesh {plan.mesh_text()} but mesh_shape is {shape}; pass mesh_shape={planned.shape}")
    if names is not None and tuple(names) != planned.names:
        raise ConfigError(f"the plan names its mesh axes {', '.join(planned.names)} but mesh_axis_names is {', '.join(names)}; leave it out to use the plan's")
    if inter_node_axes is None:
        return planned
    return MeshSpec.of(planned.shape, planned.names, inter_node_axes=inter_node_axes)


# --- one run (the reference here, or one rank) ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class RunResult:
    """What one run produced: output leaves by path, and (training) gradients and stepped parameters."""

    outputs: Mapping[str, torch.Tensor]
    grads: Mapping[str, torch.Tensor | None]
    params: Mapping[str, torch.Tensor]  # after one AdamW step (training only)
    input_grads: tuple[torch.Tensor | None, ...] = ()  # of each floating example input, by position
    adam_eps: float = 0.0
    placements: Mapping[str, Placements] = field(default_factory=dict)  # one placement per mesh axis
    collectives: Mapping[str, int] = field(default_factory=dict)
    local_elements: int = 0
    coordinate: tuple[int, ...] = ()  # this rank's position on every mesh axis


def verify_rank(
    rank: int, world_size: int, source: PickledModel | RebuiltModel, inputs: tuple[torch.Tensor, ...],
    plan: Plan, training: bool, adam_eps: float, graph_hook: GraphHook | None,
) -> RunResult:
    """One rank of ``verify``: parallelize with ``plan`` on the plan's mesh, apply ``graph_hook``, run as the reference does."""
    from torch.distributed.device_mesh import init_device_mesh

    from autotp.api import parallelize

    model = source.build()
    mesh = init_device_mesh("cpu", tuple(plan.mesh_shape), mesh_dim_names=tuple(plan.mesh_axis_names))
    sharded = parallelize(model, mesh, inputs, plan=plan, training=training, inter_node_axes=plan.inter_node_axes)
    del model
    if graph_hook is not None:
        graph_hook(sharded.graph_module, rank)
        sharded.graph_module.recompile()
    result = _run(sharded, inputs, training=training, adam_eps=adam_eps)
    placements = sharded.placements()
    whole = (Replicate(),) * len(plan.mesh_shape)
    axis_names = tuple(plan.mesh_axis_names) if len(plan.mesh_shape) > 1 else None
    return replace(
        result,
        placements={name: placements.get(name, whole) for name, _ in sharded.named_parameters(remove_duplicate=False)},
        collectives=count_collectives(sharded.graph_module, training=training, group_names=sharded.group_names, axis_names=axis_names),
        local_elements=sum(p.numel() for p in sharded.parameters()),
        coordinate=tuple(sharded.coordinate),
    )


def count_collectives(
    gm: fx.GraphModule, *, training: bool, group_names: Sequence[str] = (), axis_names: Sequence[str] | None = None,
) -> dict[str, int]:
    """Collectives in a rank-local graph by kind; with ``training`` also ``all_reduce (backward)``,
    the backward all-reduce (it communicates only when there is a backward). With ``axis_names``
    (an N-D mesh) each kind is counted per mesh axis, ``all_gather@tp``: a collective's last
    argument is its group, ``group_names[a]`` for axis ``a``."""
    from autotp.comm import collectives
    from autotp.rewrite.rewriter import collective_nodes

    def where(node: fx.Node) -> str:
        if axis_names is None:
            return ""
        group = node.args[-1]
        return "@" + (axis_names[group_names.index(group)] if group in group_names else str(group))

    kinds = Counter(n.target.__name__ + where(n) for n in collective_nodes(gm))  # type: ignore[union-attr]  # collectives are functions
    if training:
        syncs = (collectives.grad_all_reduce, collectives.linears_with_grad_sync)  # the fused linears' backward syncs their input
        kinds.update(f"all_reduce{where(n)} (backward)" for n in gm.graph.nodes if n.op == "call_function" and n.target in syncs)
    return dict(sorted(kinds.items()))


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, training: bool, adam_eps: float | None) -> RunResult:
    """Outputs; with ``training`` also the gradients of ``_loss`` and the parameters after one
    AdamW step with ``adam_eps`` (``None``: this run's largest gradient magnitude, see ``ADAMW_LR``)."""
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under every name
    if not training:
        with torch.no_grad():
            outputs = _leaves(model(*inputs))
        return RunResult(outputs, {}, {})
    inputs = tuple(t.detach().clone().requires_grad_(True) if _differentiable(t) else t for t in inputs)
    outputs = _leaves(model(*inputs))
    loss = _loss(outputs)
    if loss.requires_grad:
        loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()}
    if adam_eps is None:
        adam_eps = max(_kind_scale(g for g in grads.values() if g is not None), 1e-12)
    torch.optim.AdamW(list({id(p): p for p in params.values()}.values()), lr=ADAMW_LR, eps=adam_eps).step()
    stepped = {n: p.detach().clone() for n, p in params.items()}
    input_grads = tuple(t.grad if _differentiable(t) else None for t in inputs)
    return RunResult({k: v.detach() for k, v in outputs.items()}, grads, stepped, input_grads, adam_eps)


def _differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype.is_floating_point


def _leaves(output: Any) -> dict[str, torch.Tensor]:
    """Tensor leaves of a model output by their pytree path (``output`` for a bare tensor)."""
    flat, _ = pytree.tree_flatten_with_path(output)
    return {pytree.keystr(path) or "output": leaf for path, leaf in flat if isinstance(leaf, torch.Tensor)}


def _loss(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A fixed random projection of every floating output: each output element gets its own
    gradient, so a wrong order of elements shows (a mean or a sum of squares could hide one)."""
    total = torch.zeros(())
    for k, (_name, out) in enumerate(sorted(outputs.items())):
        if not out.dtype.is_floating_point or not out.requires_grad:
            continue
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1000 + k), dtype=torch.float32)
        total = total + (out.float() * weight).sum() / math.sqrt(out.numel())
    return total


# --- comparison ----------------------------------------------------------------------------------
def _compare(
    reference: RunResult, ranks: Sequence[RunResult], names: Sequence[str], input_names: Sequence[str], *,
    mesh_shape: tuple[int, ...], training: bool,
) -> tuple[Comparison, ...]:
    """Every output, and (training) every parameter's gradient and stepped value, once per tied group."""
    rows = [_compare_one("output", name, ref, [(r.outputs.get(name), ref) for r in ranks], "", _kind_scale(reference.outputs.values()))
            for name, ref in reference.outputs.items()]
    if not training:
        return tuple(rows)
    input_grads = [(k, g) for k, g in enumerate(reference.input_grads) if g is not None]
    scale = _kind_scale(g for _, g in input_grads)
    rows += [_compare_one("input gradient", input_names[k], g, [(r.input_grads[k], g) for r in ranks], "", scale) for k, g in input_grads]
    whole = (Replicate(),) * len(mesh_shape)
    for kind, ref_values, rank_values in (
        ("gradient", reference.grads, [r.grads for r in ranks]),
        ("parameter", reference.params, [r.params for r in ranks]),
    ):
        scale = _kind_scale(ref_values[n] for n in names if ref_values[n] is not None)
        for name in names:
            ref = ref_values[name]
            placements = ranks[0].placements.get(name, whole)
            locals_ = [values.get(name) for values in rank_values]
            if ref is None and all(t is None for t in locals_):
                continue
            pairs = [(t, None if ref is None else local_chunk(ref, placements, mesh_shape, r.coordinate or (k,))) for k, (t, r) in enumerate(zip(locals_, ranks))]
            rows.append(_compare_one(kind, name, ref, pairs, format_placements(placements), scale))
    return tuple(rows)


def _kind_scale(tensors: Any) -> float:
    return max((_magnitude(t) for t in tensors), default=0.0)


def _magnitude(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() and t.dtype.is_floating_point else 0.0


def _compare_one(
    kind: str, name: str, ref: torch.Tensor | None, pairs: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]], placement: str, kind_scale: float,
) -> Comparison:
    """``ref`` (the original's full tensor) against every rank's ``(local, expected)`` pair, where
    ``expected`` is the rank's chunk of ``ref`` (all of it for a replicated tensor); the scale is ``ref``'s."""
    dtype = str(ref.dtype if ref is not None else next(t.dtype for t, _ in pairs if t is not None)).removeprefix("torch.")
    rtol = TOLERANCES.get(ref.dtype, 0.0) if ref is not None else 0.0

    def row(max_abs: float, max_rel: float, problem: str = "") -> Comparison:
        return Comparison(kind, name, dtype, placement, max_abs, max_rel, rtol, problem)

    if ref is None:
        return row(math.inf, math.inf, "the original has no gradient here but the sharded model has one")
    if any(t is None for t, _ in pairs):
        return row(math.inf, math.inf, "missing on a rank" if kind != "gradient" else "the sharded model has no gradient here")
    bad_shape = next(((k, t, e) for k, (t, e) in enumerate(pairs) if t.shape != e.shape), None)  # type: ignore[union-attr]
    if bad_shape is not None:
        k, t, expected = bad_shape
        of = "" if expected.shape == ref.shape else f" (its chunk of {tuple(ref.shape)})"  # type: ignore[union-attr]
        return row(math.inf, math.inf, f"shape {tuple(t.shape)}, expected {tuple(expected.shape)}{of}" + (f" on rank {k}" if of else ""))  # type: ignore[union-attr]
    scale = max(_magnitude(ref), SCALE_FLOOR * kind_scale, 1e-30)
    diffs = [(t.double() - e.double()).abs() for t, e in pairs]  # type: ignore[union-attr]
    max_abs = max((d.max().item() if d.numel() else 0.0) for d in diffs)
    if math.isnan(max_abs) or any(bool(d.isnan().any()) for d in diffs):
        return row(math.nan, math.nan, "NaN")
    return row(max_abs, max_abs / scale if ref.dtype.is_floating_point else float(max_abs > 0))


# --- planning ------------------------------------------------------------------------------------
def _plan(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], mesh: MeshSpec, *, axis_roles: Mapping[int | str, str] | None, training: bool,
    memory_budget: int | str | None, hardware: str | None, optimizer: str | None,
) -> tuple[Plan, str]:
    """The plan the ranks apply, made once here; a note when the default budget had to be dropped."""
    from autotp.api import plan as make_plan
    from autotp.io.target import builtin_memory_budget

    settings: dict[str, Any] = {
        "mesh_shape": mesh.shape, "mesh_axis_names": mesh.names, "inter_node_axes": mesh.inter_node_axes, "axis_roles": axis_roles,
        "hardware": hardware or "cpu-gloo", "training": training, "optimizer": optimizer,
    }
    if memory_budget is not None:
        return make_plan(model, inputs, memory_budget=memory_budget, **settings), ""
    budget = builtin_memory_budget(model, mesh.size, training=training, optimizer=optimizer)
    try:
        return make_plan(model, inputs, memory_budget=budget, **settings), ""
    except InfeasiblePlanError:
        note = f"no plan fits the default budget of 1.3/{mesh.size} of the replicated state ({budget:,} bytes); planned without a budget"
        log.warning(note)
        return make_plan(model, inputs, memory_budget=None, **settings), note


def _pickle_model(model: nn.Module) -> bytes:
    try:
        return pickle.dumps(model)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"verify sends the model to its ranks by pickling it, and {type(model).__name__} cannot be pickled ({exc}); "
            "define the model class at module level (not inside a function) and keep no lambdas or open handles on it"
        ) from exc


def _check_real(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None or any(isinstance(t, torch.Tensor) and t.is_meta for t in inputs):
        what = f"parameter/buffer '{meta}'" if meta is not None else "an example input"
        raise ConfigError(f"verify runs the model, but {what} is on the meta device; build it with real weights and inputs on the CPU")
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in [*model.parameters(), *inputs]):
        raise ConfigError("verify runs on local CPU gloo ranks; move the model and example inputs to the CPU first")


def _elements(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the table -----------------------------------------------------------------------------------
_KIND_TITLES = {"output": "outputs", "input gradient": "input gradients", "gradient": "gradients", "parameter": "params after AdamW"}
MAX_LISTED_FAILURES = 10


def _format(report: VerifyReport) -> str:
    mode = "training: outputs, gradients, one AdamW step" if report.training else "inference: outputs"
    nd = report.mesh is not None and report.mesh.ndim > 1
    where = f" as the mesh {report.mesh}" if nd else ""
    lines = [f"autotp verify: {report.model_name} on {report.tp_size} CPU ranks{where} ({mode}), {report.seconds:.1f}s"]
    if report.error is not None:
        lines += ["FAIL: a rank did not finish:", *("  " + line for line in report.error.strip().splitlines()[-12:])]
        return "\n".join(lines)
    locals_ = ", ".join(f"{n:,}" for n in report.local_elements)
    per_axis = ""
    if nd and report.mesh is not None:
        per_axis = " (" + ", ".join(f"over {name}: {n}" for name, n in zip(report.mesh.names, report.split_per_axis)) + ")"
    lines.append(f"plan: {report.split_parameters} of {report.parameters} parameters split{per_axis}; parameter elements per rank {locals_} of {report.full_elements:,}")
    if nd and report.mesh is not None:
        lines += [f"parameter placements over ({', '.join(report.mesh.names)}):", *_placement_lines(report.placements)]
    lines.append("")
    header = ("check", "tensors", "worst", "max abs", "max rel", "tolerance", "result")
    rows = [header]
    for kind, title in _KIND_TITLES.items():
        group = [c for c in report.comparisons if c.kind == kind]
        if not group:
            continue
        worst = max(group, key=lambda c: (not c.passed, c.max_rel if not math.isnan(c.max_rel) else math.inf))
        failed = sum(not c.passed for c in group)
        dtypes = sorted({c.dtype for c in group})
        tol = "/".join(f"{_fmt(min(c.rtol for c in group if c.dtype == d))} {d}" for d in dtypes)
        rows.append((title, str(len(group)), _short(worst.name), _fmt(worst.max_abs), _fmt(worst.max_rel), tol, "ok" if not failed else f"{failed} FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) if i in (0, 2, 5, 6) else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
    failures = report.failures()
    if failures:
        lines += ["", "failed tensors (max rel > tolerance):"]
        for c in failures[:MAX_LISTED_FAILURES]:
            why = c.problem or f"max abs {_fmt(c.max_abs)}, max rel {_fmt(c.max_rel)} > {_fmt(c.rtol)}"
            lines.append(f"  {c.kind} {c.name}" + (f" [{c.placement}]" if c.placement else "") + f": {why}")
        if len(failures) > MAX_LISTED_FAILURES:
            lines.append(f"  ... and {len(failures) - MAX_LISTED_FAILURES} more")
    lines += ["", "collectives per rank (rank-local graph" + (", @ the mesh axis they run over):" if nd else "):")]
    for rank, kinds in enumerate(report.collectives):
        lines.append(f"  rank {rank}: " + (", ".join(f"{k} x{v}" for k, v in kinds.items()) or "none"))
    lines += [f"note: {note}" for note in report.notes]
    lines.append("")
    if not report.passed:
        lines.append("FAIL: the sharded model differs from the original")
    elif report.trivial:
        lines.append("PASS, TRIVIALLY: the plan splits nothing and runs no collective, so the sharded model is the original; "
                     "give a smaller memory budget or a plan that splits to check the sharded path")
    else:
        lines.append("PASS: the sharded model matches the original within tolerance")
    return "\n".join(lines)


def _placement_lines(placements: Sequence[tuple[str, str]], listed: int = 3) -> list[str]:
    """One line per distinct placement: how many parameters take it, and the first few of them."""
    by_placement: dict[str, list[str]] = {}
    for name, placement in placements:
        by_placement.setdefault(placement, []).append(name)
    lines = []
    for placement, names in by_placement.items():
        more = f", ... ({len(names) - listed} more)" if len(names) > listed else ""
        lines.append(f"  {placement} x{len(names)}: " + ", ".join(names[:listed]) + more)
    return lines


def _fmt(x: float) -> str:
    return "-" if math.isinf(x) or math.isnan(x) else f"{x:.1e}"


def _short(name: str, width: int = 36) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
