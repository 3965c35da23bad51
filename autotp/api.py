"""The public entry points: ``plan`` (offline, any device) and ``parallelize`` (inside each rank)."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from cost_models import OPTIMIZER_STATE_BYTES_PER_ELEMENT, HardwareProfile
from autotp.capture.export import CapturedGraph, InputRole, capture
from autotp.capture.torch_compat import non_persistent_buffer_names
from autotp.cost.model import CostModel, resolve_hardware
from autotp.errors import ConfigError, PlanMismatchError
from autotp.io.fingerprint import describe_mismatch
from autotp.io.plan_align import align_plan
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import local_chunk
from autotp.ir.plan import Plan
from autotp.ir.units import fmt_seconds, parse_nbytes
from autotp.report.progress import Progress, stage
from autotp.rewrite.random import seed_sharded_stream
from autotp.rewrite.rewriter import rewrite
from autotp.runtime.agreement import DEFAULT_SETUP_TIMEOUT_S, agree_on_plan, setup_group
from autotp.runtime.arguments import PlannedCall
from autotp.runtime.module import ShardedModule, register_state
from autotp.runtime.retrace import Retracer
from autotp.solve.ilp import NODE_LIMIT
from autotp.solve.planner import solve_plan
from autotp.strategies.engine import AxisRole, StrategySpace, axis_role_map, build_strategy_space

log = logging.getLogger(__name__)

DEFAULT_HARDWARE = {"cuda": "h100-sxm", "cpu": "cpu-gloo"}


@dataclass(frozen=True, slots=True)
class PlanningResult:
    """Everything planning produced, for callers that need more than the ``Plan``."""

    captured: CapturedGraph
    space: StrategySpace
    plan: Plan


def plan(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    mesh_shape: int | Sequence[int],
    mesh_axis_names: Sequence[str] | None = None,
    inter_node_axes: Sequence[int | str] | None = None,
    axis_roles: Mapping[int | str, str] | None = None,
    hardware: str | HardwareProfile | None = "h100-sxm",
    memory_budget: int | str | None = None,
    training: bool = True,
    optimizer: str | None = "adamw",
    solver: str = "cbc",
    time_limit_s: float = 60.0,
    node_limit: int = NODE_LIMIT,
    symbolic: bool = False,
) -> Plan:
    """Plan ``model`` for a mesh of ``mesh_shape`` without any process group (meta models work).

    A mesh may have any number of axes (``(2, 4)``: 2 groups of 4), named by ``mesh_axis_names``
    (default ``("tp",)`` on 1-D, ``("axis0", "axis1", ...)`` otherwise). Every axis is planned
    alike: data parallelism, FSDP and tensor parallelism are strategies the solver picks per axis;
    ``axis_roles`` pins an axis's role (``{"dp": "data"}``: parameters replicated over it;
    ``"fsdp"``: parameters split over it; ``"any"``: the solver's choice). ``inter_node_axes`` names
    the axes whose groups span nodes when the ranks are not numbered node by node (``autotp.ir.mesh``).

    ``training`` prices forward and backward and counts gradients and ``optimizer`` state in
    ``memory_budget``; ``training=False`` plans for inference (forward only, parameters only).
    ``symbolic`` also captures the model at a few more sizes so that ``plan.cost_expression()``
    gives the time as a sympy expression in batch ``B`` and sequence length ``T`` (dims 0 and 1
    of the inputs; see ``autotp.cost.symbolic``).

    The solver stops at ``node_limit`` branch-and-bound nodes (the same plan on every machine; its
    status gives the gap when it is not proven optimal); ``time_limit_s`` is a safety net that
    returns a deterministic fallback plan with a ``SolverTimeLimitWarning`` (docs/scale.md).
    """
    result = plan_model(
        model, example_inputs, mesh_shape=mesh_shape, mesh_axis_names=mesh_axis_names, inter_node_axes=inter_node_axes,
        axis_roles=axis_roles, hardware=hardware or "h100-sxm",
        memory_budget=memory_budget, training=training, optimizer=optimizer, solver=solver, time_limit_s=time_limit_s,
        node_limit=node_limit,
    ).plan
    if symbolic:
        from autotp.cost.symbolic import attach_cost_terms

        result = attach_cost_terms(result, model, example_inputs, hardware=hardware or "h100-sxm")
    return result


def plan_model(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    mesh_shape: int | Sequence[int],
    hardware: str | HardwareProfile,
    memory_budget: int | str | None,
    mesh_axis_names: Sequence[str] | None = None,
    inter_node_axes: Sequence[int | str] | None = None,
    axis_roles: Mapping[int | str, str] | None = None,
    training: bool = True,
    optimizer: str | None = "adamw",
    solver: str = "cbc",
    time_limit_s: float = 60.0,
    node_limit: int = NODE_LIMIT,
    progress: Progress | None = None,
) -> PlanningResult:
    """Capture, build the strategy space, solve and build the plan; ``progress`` hears each stage
    start and end, and the solver's incumbents (``autotp.report.progress``)."""
    mesh = MeshSpec.of(mesh_shape, mesh_axis_names, inter_node_axes=inter_node_axes)
    roles = axis_role_map(mesh, axis_roles)
    profile, budget = _planning_settings(hardware, memory_budget, optimizer)
    started = time.perf_counter()
    captured, space = _capture_space(model, example_inputs, mesh, roles=roles, progress=progress)
    result = _solve_space(
        space, profile=profile, memory_budget=budget, training=training, optimizer=optimizer,
        solver=solver, time_limit_s=time_limit_s, node_limit=node_limit, progress=progress,
    )
    log.info("planned %s on the mesh %s in %.2fs", captured.model_name, mesh, time.perf_counter() - started)
    return PlanningResult(captured, space, result)


def _capture_space(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], mesh: MeshSpec, *,
    roles: Mapping[int, AxisRole] | None = None, progress: Progress | None = None,
) -> tuple[CapturedGraph, StrategySpace]:
    """The graph and its candidate strategies: what every rank builds, planning or not."""
    started = time.perf_counter()
    with stage(progress, "capture") as report:
        captured = capture(model, example_inputs)
        report.outcome = f"{len(captured.graph_module.graph.nodes)} nodes"
    log.info("captured %s: %d nodes in %.2fs", captured.model_name, len(captured.graph_module.graph.nodes), time.perf_counter() - started)
    with stage(progress, "strategies") as report:
        space = build_strategy_space(captured, mesh, axis_roles=roles)
        report.outcome = f"{sum(len(n.strategies) for n in space.nodes)} candidates"
    return captured, space


def _planning_settings(
    hardware: str | HardwareProfile, memory_budget: int | str | None, optimizer: str | None,
) -> tuple[HardwareProfile, int | None]:
    """The hardware profile and budget in bytes; checked before the (slow) capture."""
    if optimizer is not None and optimizer.lower() not in OPTIMIZER_STATE_BYTES_PER_ELEMENT:
        raise ConfigError(f"unknown optimizer {optimizer!r}; known: {', '.join(sorted(OPTIMIZER_STATE_BYTES_PER_ELEMENT))}")
    return resolve_hardware(hardware), parse_nbytes(memory_budget)


def _solve_space(
    space: StrategySpace,
    *,
    profile: HardwareProfile,
    memory_budget: int | None,
    training: bool,
    optimizer: str | None,
    solver: str = "cbc",
    time_limit_s: float = 60.0,
    node_limit: int = NODE_LIMIT,
    progress: Progress | None = None,
) -> Plan:
    cost = CostModel(profile, space.mesh, training=training, optimizer=optimizer if training else None)
    with stage(progress, "solve") as report:
        def on_incumbent(seconds: float, bound_seconds: float | None) -> None:
            report.update(f"incumbent {fmt_seconds(seconds)}" + (f", bound {fmt_seconds(bound_seconds)}" if bound_seconds is not None else ""))

        result = solve_plan(
            space, cost, hardware=profile.name, memory_budget=memory_budget, time_limit_s=time_limit_s, node_limit=node_limit, solver=solver,
            on_incumbent=on_incumbent if progress is not None else None,
        )
        report.outcome = f"{result.solver_status}, {fmt_seconds(result.total_seconds)}"
    return result


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    hardware: str | HardwareProfile | None = None,
    memory_budget: int | str | None = None,
    plan: Plan | None = None,
    training: bool = True,
    optimizer: str | None = "adamw",
    dynamic_dims: Mapping[str, Sequence[int]] | None = None,
    setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S,
    inter_node_axes: Sequence[int | str] | None = None,
    axis_roles: Mapping[int | str, str] | None = None,
) -> ShardedModule:
    """Return this rank's sharded copy of ``model``; call it on every rank of ``mesh``.

    With ``plan=None`` the mesh's rank 0 plans and sends the plan to the others; every rank
    captures its own graph, and the ranks check that they run the same graph, plan and autotp and
    torch versions (``autotp.runtime.agreement``): if not, every rank raises ``PlanMismatchError``
    naming the rank and what differs. ``setup_timeout_s`` bounds each set-up collective, rank 0's
    planning included: a rank that does not arrive in time is a ``SetupTimeoutError`` on the others.
    The sharded module takes inputs of ``example_inputs``' shapes and values; ``dynamic_dims``
    names the dims of tensor inputs that may take other sizes (``{"input_ids": (0, 1)}``, by
    ``forward``'s parameter names): each new size is captured again on every rank, with the same plan.

    ``mesh`` may have any number of axes (``init_device_mesh("cuda", (2, 8), mesh_dim_names=("dp", "tp"))``);
    its axis names name the plan's axes, and ``axis_roles``/``inter_node_axes`` are as in ``autotp.plan``.
    """
    if not isinstance(mesh, DeviceMesh):
        raise ConfigError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if not setup_timeout_s > 0:
        raise ConfigError(f"setup_timeout_s must be a positive number of seconds, got {setup_timeout_s!r}")
    spec = MeshSpec.of(tuple(mesh.shape), mesh.mesh_dim_names, inter_node_axes=inter_node_axes)
    roles = axis_role_map(spec, axis_roles)
    planned_call = PlannedCall.from_example(model.forward, example_inputs, model_name=type(model).__name__, dynamic_dims=dynamic_dims)
    hardware = hardware or DEFAULT_HARDWARE.get(mesh.device_type, "h100-sxm")
    group_names = tuple(mesh.get_group(axis).group_name for axis in range(mesh.ndim))
    coordinate = tuple(mesh.get_local_rank(axis) for axis in range(mesh.ndim))

    def solve(space: StrategySpace) -> Plan:  # rank 0 only
        profile, budget = _planning_settings(hardware, memory_budget, optimizer)
        return _solve_space(space, profile=profile, memory_budget=budget, training=training, optimizer=optimizer)

    captured, space, agreed = agree_on_plan(
        setup_group(mesh.mesh.flatten().tolist(), timeout_s=setup_timeout_s),
        build_graph=lambda: _capture_space(model, example_inputs, spec, roles=roles if plan is None else None),
        solve=solve, fit=_fit_plan, given_plan=plan,
    )
    result = PlanningResult(captured, space, agreed)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else None
    gm = rewrite(result.captured, result.space, result.plan, coordinate=coordinate, group_names=group_names, device=device)
    local = _local_state(model, result, coordinate=coordinate, device=device)
    retracer = (
        Retracer(model, result.captured, result.plan, planned_call, coordinate=coordinate, group_names=group_names, device=device)
        if planned_call.has_dynamic_dims else None
    )
    sharded = ShardedModule(
        result.captured, gm, local, result.plan, planned_call=planned_call, coordinate=coordinate, group_names=group_names, mesh=mesh, retracer=retracer,
    )
    for group_name, position in zip(group_names, coordinate):  # a split random op draws from its axis's per-rank stream
        seed_sharded_stream(group_name, rank=position, seed=torch.initial_seed())
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    non_persistent = {f"{path}.{name}".lstrip(".") for path, module in model.named_modules() for name in non_persistent_buffer_names(module)}
    for fqn in result.captured.unused_fqns:  # kept whole, so the state dict matches the original's
        role = InputRole.PARAMETER if fqn in parameter_names else InputRole.BUFFER
        register_state(sharded, fqn, _owned(_get_state(model, fqn), device), role, persistent=fqn not in non_persistent)
    return sharded


def _apply_plan(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], plan: Plan, mesh: MeshSpec) -> PlanningResult:
    _check_plan_mesh(plan, mesh)  # before the capture: it is the cheap check
    captured, space = _capture_space(model, example_inputs, mesh)
    return PlanningResult(captured, space, _fit_plan(space, plan))


def _check_plan_mesh(plan: Plan, mesh: MeshSpec) -> None:
    if tuple(plan.mesh_shape) == mesh.shape:
        return
    if len(plan.mesh_shape) == 1 and mesh.ndim == 1:  # worded as before N-D meshes
        raise PlanMismatchError(f"the plan was made for {plan.mesh_shape[0]} ranks but the mesh has {mesh.shape[0]}")
    raise PlanMismatchError(f"the plan was made for a mesh of shape {tuple(plan.mesh_shape)} but the mesh has shape {mesh.shape}")


def _fit_plan(space: StrategySpace, plan: Plan) -> Plan:
    """``plan`` aligned to this rank's graph; ``PlanMismatchError`` naming what differs if it does not fit."""
    _check_plan_mesh(plan, space.mesh)
    mismatch = describe_mismatch(plan, space)  # the graph fingerprint first: it names what differs
    if mismatch is not None:
        raise PlanMismatchError(mismatch)
    plan = align_plan(plan, space)  # layout-only ops may differ between the meta and the real graph
    names = {n.name: n for n in space.nodes}
    for node in plan.nodes:
        candidate = names.get(node.name)
        if candidate is None or node.strategy not in candidate.strategies:
            raise PlanMismatchError(
                "the plan does not fit this model: "
                + (f"node '{node.name}' ({node.op}) does not exist in its graph" if candidate is None else f"{candidate.describe()} cannot take strategy {node.strategy}")
            )
    if len(plan.nodes) != len(space.nodes):
        raise PlanMismatchError(f"the plan has {len(plan.nodes)} nodes but this model's graph has {len(space.nodes)}")
    return plan


def _get_state(model: nn.Module, fqn: str) -> torch.Tensor:
    owner, _, name = fqn.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, name)


def _owned(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """A copy that owns its memory, so the full original can be freed."""
    out = tensor.detach().to(device) if device is not None else tensor.detach()
    out = out.clone()
    return nn.Parameter(out, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else out


def _local_state(model: nn.Module, result: PlanningResult, *, coordinate: tuple[int, ...], device: torch.device | None) -> dict[str, torch.Tensor]:
    """This rank's chunk of every parameter/buffer/constant placeholder, sliced once."""
    strategies = {n.name: n.strategy for n in result.plan.nodes}  # .output of state only: a multi-output op has none
    local: dict[str, torch.Tensor] = {}
    mesh_shape = tuple(result.plan.mesh_shape)
    for gi in result.captured.inputs:
        if gi.role is InputRole.USER_INPUT:
            continue
        full = result.captured.constants[gi.node_name] if gi.role is InputRole.CONSTANT else _get_state(model, gi.fqns[0])
        if full.is_meta:
            raise ConfigError(f"parallelize needs real weights but '{gi.fqns[0] if gi.fqns else gi.node_name}' is on the meta device; use autotp.plan() to plan meta models, or materialise the model first")
        owned = _owned(local_chunk(full.detach(), strategies[gi.node_name].output, mesh_shape, coordinate), device)
        if isinstance(full, nn.Parameter):
            owned = nn.Parameter(owned, requires_grad=full.requires_grad)
        local[gi.node_name] = owned
    return local
