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
from autotp.ir.placement import Shard
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
from autotp.strategies.engine import StrategySpace, build_strategy_space

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
    mesh_shape: Sequence[int],
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
        model, example_inputs, mesh_shape=mesh_shape, hardware=hardware or "h100-sxm",
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
    mesh_shape: Sequence[int],
    hardware: str | HardwareProfile,
    memory_budget: int | str | None,
    training: bool = True,
    optimizer: str | None = "adamw",
    solver: str = "cbc",
    time_limit_s: float = 60.0,
    node_limit: int = NODE_LIMIT,
    progress: Progress | None = None,
) -> PlanningResult:
    """Capture, build the strategy space, solve and build the plan; ``progress`` hears each stage
    start and end, and the solver's incumbents (``autotp.report.progress``)."""
    tp_size = _tp_size(mesh_shape)
    profile, budget = _planning_settings(hardware, memory_budget, optimizer)
    started = time.perf_counter()
    captured, space = _capture_space(model, example_inputs, tp_size, progress=progress)
    result = _solve_space(
        space, profile=profile, memory_budget=budget, training=training, optimizer=optimizer,
        solver=solver, time_limit_s=time_limit_s, node_limit=node_limit, progress=progress,
    )
    log.info("planned %s on %d ranks in %.2fs", captured.model_name, tp_size, time.perf_counter() - started)
    return PlanningResult(captured, space, result)


def _capture_space(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], tp_size: int, *, progress: Progress | None = None,
) -> tuple[CapturedGraph, StrategySpace]:
    """The graph and its candidate strategies: what every rank builds, planning or not."""
    started = time.perf_counter()
    with stage(progress, "capture") as report:
        captured = capture(model, example_inputs)
        report.outcome = f"{len(captured.graph_module.graph.nodes)} nodes"
    log.info("captured %s: %d nodes in %.2fs", captured.model_name, len(captured.graph_module.graph.nodes), time.perf_counter() - started)
    with stage(progress, "strategies") as report:
        space = build_strategy_space(captured, tp_size)
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
    cost = CostModel(profile, space.tp_size, training=training, optimizer=optimizer if training else None)
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
    """
    if not isinstance(mesh, DeviceMesh):
        raise ConfigError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ConfigError(f"autotp supports 1-D meshes for now; got a mesh of shape {tuple(mesh.shape)}")
    if not setup_timeout_s > 0:
        raise ConfigError(f"setup_timeout_s must be a positive number of seconds, got {setup_timeout_s!r}")
    tp_size = mesh.size()
    planned_call = PlannedCall.from_example(model.forward, example_inputs, model_name=type(model).__name__, dynamic_dims=dynamic_dims)
    hardware = hardware or DEFAULT_HARDWARE.get(mesh.device_type, "h100-sxm")
    group = mesh.get_group()

    def solve(space: StrategySpace) -> Plan:  # rank 0 only
        profile, budget = _planning_settings(hardware, memory_budget, optimizer)
        return _solve_space(space, profile=profile, memory_budget=budget, training=training, optimizer=optimizer)

    captured, space, agreed = agree_on_plan(
        setup_group(group, timeout_s=setup_timeout_s), build_graph=lambda: _capture_space(model, example_inputs, tp_size),
        solve=solve, fit=_fit_plan, given_plan=plan,
    )
    result = PlanningResult(captured, space, agreed)
    rank = mesh.get_local_rank()
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else None
    gm = rewrite(result.captured, result.space, result.plan, rank=rank, group_name=group.group_name, device=device)
    local = _local_state(model, result, rank=rank, device=device)
    retracer = (
        Retracer(model, result.captured, result.plan, planned_call, rank=rank, group_name=group.group_name, device=device)
        if planned_call.has_dynamic_dims else None
    )
    sharded = ShardedModule(
        result.captured, gm, local, result.plan, planned_call=planned_call, rank=rank, group_name=group.group_name, mesh=mesh, retracer=retracer,
    )
    seed_sharded_stream(group.group_name, rank=rank, seed=torch.initial_seed())
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    non_persistent = {f"{path}.{name}".lstrip(".") for path, module in model.named_modules() for name in non_persistent_buffer_names(module)}
    for fqn in result.captured.unused_fqns:  # kept whole, so the state dict matches the original's
        role = InputRole.PARAMETER if fqn in parameter_names else InputRole.BUFFER
        register_state(sharded, fqn, _owned(_get_state(model, fqn), device), role, persistent=fqn not in non_persistent)
    return sharded


def _tp_size(mesh_shape: Sequence[int]) -> int:
    shape = tuple(mesh_shape) if not isinstance(mesh_shape, int) else (mesh_shape,)
    if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
        raise ConfigError(f"mesh_shape must be a 1-D shape such as (4,), got {mesh_shape!r}")
    return shape[0]


def _apply_plan(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], plan: Plan, tp_size: int) -> PlanningResult:
    if plan.tp_size != tp_size:  # before the capture: it is the cheap check
        raise PlanMismatchError(f"the plan was made for {plan.tp_size} ranks but the mesh has {tp_size}")
    captured, space = _capture_space(model, example_inputs, tp_size)
    return PlanningResult(captured, space, _fit_plan(space, plan))


def _fit_plan(space: StrategySpace, plan: Plan) -> Plan:
    """``plan`` aligned to this rank's graph; ``PlanMismatchError`` naming what differs if it does not fit."""
    if plan.tp_size != space.tp_size:
        raise PlanMismatchError(f"the plan was made for {plan.tp_size} ranks but the mesh has {space.tp_size}")
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


def _local_state(model: nn.Module, result: PlanningResult, *, rank: int, device: torch.device | None) -> dict[str, torch.Tensor]:
    """This rank's chunk of every parameter/buffer/constant placeholder, sliced once."""
    placements = {n.name: n.strategy.output for n in result.plan.nodes}
    local: dict[str, torch.Tensor] = {}
    tp_size = result.plan.tp_size
    for gi in result.captured.inputs:
        if gi.role is InputRole.USER_INPUT:
            continue
        full = result.captured.constants[gi.node_name] if gi.role is InputRole.CONSTANT else _get_state(model, gi.fqns[0])
        if full.is_meta:
            raise ConfigError(f"parallelize needs real weights but '{gi.fqns[0] if gi.fqns else gi.node_name}' is on the meta device; use autotp.plan() to plan meta models, or materialise the model first")
        placement = placements[gi.node_name]
        chunk = full.detach().chunk(tp_size, dim=placement.dim)[rank] if isinstance(placement, Shard) else full.detach()
        owned = _owned(chunk, device)
        if isinstance(full, nn.Parameter):
            owned = nn.Parameter(owned, requires_grad=full.requires_grad)
        local[gi.node_name] = owned
    return local
