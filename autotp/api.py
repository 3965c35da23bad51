"""The public entry points: ``plan`` (offline, any device) and ``parallelize`` (inside each rank)."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from cost_models import OPTIMIZER_STATE_BYTES_PER_ELEMENT, HardwareProfile
from autotp.capture.export import CapturedGraph, InputRole, capture
from autotp.capture.torch_compat import pytree
from autotp.cost.model import CostModel, resolve_hardware
from autotp.errors import ConfigError, PlanMismatchError
from autotp.io.dcp_checkpoint import DcpCheckpoint
from autotp.io.fingerprint import describe_mismatch
from autotp.io.plan_align import align_plan
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import local_chunk
from autotp.ir.plan import Plan
from autotp.ir.units import fmt_seconds, parse_nbytes
from autotp.report.progress import Progress, stage
from autotp.rewrite.random import seed_sharded_stream
from autotp.rewrite.rewriter import rewrite
from autotp.runtime import replicas
from autotp.runtime.agreement import DEFAULT_SETUP_TIMEOUT_S, SetupGroup, agree_on_plan, check_mesh_groups, setup_group, share_outcome
from autotp.runtime.arguments import PlannedCall
from autotp.runtime.materialize import Checkpoint, check_checkpoint, local_parts, open_checkpoint, read_dcp_parts
from autotp.runtime.module import ShardedModule, register_state
from autotp.runtime.retrace import Retracer
from autotp.runtime.shard_init import InitFn
from autotp.runtime.targets import StateTarget, get_state, non_persistent_names, state_aliases, state_targets
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
    overlap: bool = True,
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
    of the inputs; see ``autotp.cost.symbolic``). ``overlap`` prices communication hidden behind
    compute beside it (``autotp.comm.overlap``; the solver then favours layouts that hide it);
    ``overlap=False`` charges every collective in full.

    The solver stops at ``node_limit`` branch-and-bound nodes (the same plan on every machine; its
    status gives the gap when it is not proven optimal); ``time_limit_s`` is a safety net that
    returns a deterministic fallback plan with a ``SolverTimeLimitWarning`` (docs/scale.md).
    """
    result = plan_model(
        model, example_inputs, mesh_shape=mesh_shape, mesh_axis_names=mesh_axis_names, inter_node_axes=inter_node_axes,
        axis_roles=axis_roles, hardware=hardware or "h100-sxm",
        memory_budget=memory_budget, training=training, optimizer=optimizer, solver=solver, time_limit_s=time_limit_s,
        node_limit=node_limit, overlap=overlap,
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
    overlap: bool = True,
) -> PlanningResult:
    """Capture, build the strategy space, solve and build the plan; ``progress`` hears each stage
    start and end, and the solver's incumbents (``autotp.report.progress``). ``overlap`` as in
    :func:`plan`."""
    mesh = MeshSpec.of(mesh_shape, mesh_axis_names, inter_node_axes=inter_node_axes)
    roles = axis_role_map(mesh, axis_roles)
    profile, budget = _planning_settings(hardware, memory_budget, optimizer)
    started = time.perf_counter()
    captured, space = _capture_space(model, example_inputs, mesh, roles=roles, progress=progress)
    result = _solve_space(
        space, profile=profile, memory_budget=budget, training=training, optimizer=optimizer,
        solver=solver, time_limit_s=time_limit_s, node_limit=node_limit, progress=progress, overlap=overlap,
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
    overlap: bool = True,
) -> Plan:
    cost = CostModel(profile, space.mesh, training=training, optimizer=optimizer if training else None, overlap=overlap)
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
    weights: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    init_fn: InitFn | None = None,
    strict: bool = True,
    check_replicas: bool = True,
    overlap: bool = True,
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

    A model bigger than one rank is built on the meta device and never exists whole on any rank:
    ``weights`` (a Hugging Face safetensors file or directory, or a DCP checkpoint directory) gives
    each rank only its part of every tensor; it is checked against the model first (missing,
    unexpected with ``strict``, mis-shaped or mis-typed tensors are one ``CheckpointError``).
    Without ``weights`` a meta tensor is initialised part by part, by ``init_fn(name, local,
    global_shape, shard)`` or by its module's own initialiser (``autotp.runtime.shard_init``).
    ``dtype`` converts the model's floating-point tensors in place (``model.to(dtype)``) before
    capture, and the checkpoint's on load.

    Ranks that hold the same part of a tensor must hold the same values (every rank builds the
    model with the same seed, or loads the same weights): with ``check_replicas`` the ranks
    compare a checksum of each part (``autotp.runtime.replicas``) and raise ``PlanMismatchError``
    naming the first tensor that differs; ``check_replicas=False`` skips that read of every such part.

    ``overlap`` (default) runs communication beside computation (``autotp.comm.overlap``): a
    forward collective starts as soon as its value is ready and is waited for just before its
    first reader, and column-parallel linears reading one replicated input all-reduce its
    gradient while they compute their weight gradients. ``overlap=False`` blocks at every
    collective where its value is read (the same numbers; for debugging and comparison).
    """
    if not isinstance(mesh, DeviceMesh):
        raise ConfigError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    check_mesh_groups(mesh)
    if not setup_timeout_s > 0:
        raise ConfigError(f"setup_timeout_s must be a positive number of seconds, got {setup_timeout_s!r}")
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
        model.to(dtype)
    spec = MeshSpec.of(tuple(mesh.shape), mesh.mesh_dim_names, inter_node_axes=inter_node_axes)
    roles = axis_role_map(spec, axis_roles)
    planned_call = PlannedCall.from_example(model.forward, example_inputs, model_name=type(model).__name__, dynamic_dims=dynamic_dims)
    hardware = hardware or DEFAULT_HARDWARE.get(mesh.device_type, "h100-sxm")
    group_names = tuple(mesh.get_group(axis).group_name for axis in range(mesh.ndim))
    coordinate = tuple(mesh.get_local_rank(axis) for axis in range(mesh.ndim))

    def solve(space: StrategySpace) -> Plan:  # rank 0 only
        profile, budget = _planning_settings(hardware, memory_budget, optimizer)
        return _solve_space(space, profile=profile, memory_budget=budget, training=training, optimizer=optimizer, overlap=overlap)

    checkpoint: Checkpoint | None = None

    def build_graph() -> tuple[CapturedGraph, StrategySpace]:  # every rank; a failure here reaches the others
        nonlocal checkpoint
        if weights is not None:  # before the capture: a wrong checkpoint is the cheap check
            checkpoint = open_checkpoint(weights)
            check_checkpoint(model, checkpoint, strict=strict, convert_dtypes=dtype is not None)
        return _capture_space(model, _beside(model, example_inputs), spec, roles=roles if plan is None else None)

    setup = setup_group(mesh.mesh.flatten().tolist(), timeout_s=setup_timeout_s)
    captured, space, agreed = agree_on_plan(setup, build_graph=build_graph, solve=solve, fit=_fit_plan, given_plan=plan)
    result = PlanningResult(captured, space, agreed)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    gm = rewrite(result.captured, result.space, result.plan, coordinate=coordinate, group_names=group_names, device=device, overlap=overlap)
    targets = state_targets(model, result.captured, result.plan, coordinate)
    state = _load_state(targets, model, setup, checkpoint=checkpoint, init_fn=init_fn, device=device, mesh=mesh)
    if check_replicas:
        replicas.check_replicas(setup, targets, state, mesh_shape=tuple(mesh.shape))
    local = _local_state(model, result, state, coordinate=coordinate, device=device)
    retracer = (
        Retracer(model, result.captured, result.plan, planned_call, coordinate=coordinate, group_names=group_names, device=device, overlap=overlap)
        if planned_call.has_dynamic_dims else None
    )
    sharded = ShardedModule(
        result.captured, gm, local, result.plan, planned_call=planned_call, coordinate=coordinate, group_names=group_names, mesh=mesh, retracer=retracer,
    )
    for group_name, position in zip(group_names, coordinate):  # a split random op draws from its axis's per-rank stream
        seed_sharded_stream(group_name, rank=position, seed=torch.initial_seed())
    non_persistent = non_persistent_names(model)
    aliases = state_aliases(model)
    for fqn in result.captured.unused_fqns:  # kept whole, so the state dict matches the original's
        original = get_state(model, fqn)
        role = InputRole.PARAMETER if isinstance(original, nn.Parameter) else InputRole.BUFFER
        register_state(sharded, fqn, _as_state(state[aliases[fqn][0]], original), role, persistent=fqn not in non_persistent)
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


def _beside(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The inputs on the meta device when the model has state there: a model too big for one rank
    is captured as a skeleton (the graph is the same; the rewriter puts its factory ops on this rank's device)."""
    if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return example_inputs
    return pytree.tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, example_inputs)


def _load_state(
    targets: Mapping[str, StateTarget], model: nn.Module, setup: SetupGroup, *, checkpoint: Checkpoint | None, init_fn: InitFn | None,
    device: torch.device | None, mesh: DeviceMesh,
) -> dict[str, torch.Tensor]:
    """This rank's part of every parameter and buffer, by its first name (``autotp.runtime.materialize``).

    A rank that fails to read or initialise its parts tells the others before any collective that
    needs it (a DCP read, or the first call), so every rank raises rather than waits.
    """
    state: dict[str, torch.Tensor] = {}
    dcp_parts: dict[str, torch.Tensor] = {}
    error: Exception | None = None
    try:
        state, dcp_parts = local_parts(model, targets, checkpoint=checkpoint, init_fn=init_fn, device=device)
    except Exception as exc:  # noqa: BLE001 - carried to the other ranks, re-raised below
        error = exc
    share_outcome(setup, error, step="loading this rank's weights")
    if isinstance(checkpoint, DcpCheckpoint) and dcp_parts:
        read_dcp_parts(checkpoint, targets, dcp_parts, mesh=mesh, process_group=setup.group)
        state.update(dcp_parts)
    return state


def _as_state(local: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``local`` as the model holds ``original``: a parameter (with its ``requires_grad``) or a buffer."""
    return nn.Parameter(local, requires_grad=original.requires_grad) if isinstance(original, nn.Parameter) else local


def _local_state(
    model: nn.Module, result: PlanningResult, state: Mapping[str, torch.Tensor], *, coordinate: tuple[int, ...], device: torch.device | None,
) -> dict[str, torch.Tensor]:
    """Every graph placeholder's tensor but the user inputs: this rank's state parts, and the lifted constants."""
    local: dict[str, torch.Tensor] = {}
    strategies = {n.name: n.strategy for n in result.plan.nodes}
    for gi in result.captured.inputs:
        if gi.role is InputRole.USER_INPUT:
            continue
        if gi.role is InputRole.CONSTANT:
            constant = result.captured.constants[gi.node_name]
            if constant.is_meta:
                raise ConfigError(
                    f"the tensor constant '{gi.node_name}' of the model is on the meta device and no checkpoint holds constants; "
                    "register it as a buffer (register_buffer) so it can be loaded or initialised"
                )
            local[gi.node_name] = local_chunk(constant.detach(), strategies[gi.node_name].output, result.plan.mesh_shape, coordinate).to(device, copy=True)
        else:
            local[gi.node_name] = _as_state(state[gi.fqns[0]], get_state(model, gi.fqns[0]))
    return local
