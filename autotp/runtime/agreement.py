"""One plan per job: rank 0 of the mesh plans, every rank checks it runs the same graph, plan and library.

``parallelize`` without ``plan=`` solves on the mesh's rank 0 only and broadcasts the plan (its
JSON form), so a solver that stops at its time limit cannot leave two ranks with two incumbents.
Every rank still captures its own graph (the rank-local rewrite needs it), and that is what can
differ: another sequence length, dtype, model config or library version on one rank. So the set-up
is two collectives that every rank reaches, whatever failed locally, carrying its outcome:

    1. broadcast from rank 0   versions, graph summary (fingerprint, every input's dtype[shape]),
                               the plan, or why rank 0 failed
    2. all-gather              each rank's outcome: what differs from rank 0, the digest of the plan
                               it would run, or why it failed

Both run on a dedicated gloo group created with ``timeout=setup_timeout_s``, so a rank that never
arrives (it crashed, hangs, or does not call ``parallelize``) is a ``SetupTimeoutError``, not a
hang, also on NCCL meshes. After step 2 every rank knows every outcome and decides alike
(``settle``): a rank that failed re-raises its own error; otherwise a disagreement is a
``PlanMismatchError`` naming the rank and what differs (``rank 1: input_ids is int64[2,8], rank 0
planned int64[2,16]``); otherwise another rank's failure is a ``PeerRankError`` naming it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from autotp.capture.export import CapturedGraph, GraphInput, InputRole
from autotp.errors import ConfigError, PeerRankError, PlanMismatchError, SetupTimeoutError
from autotp.io.fingerprint import describe_mismatch, space_fingerprint
from autotp.ir.plan import Plan
from autotp.ir.values import format_value
from autotp.strategies.engine import StrategySpace

log = logging.getLogger(__name__)

# Long enough for rank 0 to capture and solve a 70B-shape model under the solver's default 60 s
# limit (docs/scale.md: about 25 s of planning), short enough that a lost rank is an error within
# minutes rather than after the 30-minute default of init_process_group.
DEFAULT_SETUP_TIMEOUT_S = 300.0

try:
    AUTOTP_VERSION = importlib.metadata.version("autotp")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    AUTOTP_VERSION = "unknown"

T = TypeVar("T")


def library_versions() -> tuple[tuple[str, str], ...]:
    """The libraries whose versions decide the graph and the plan (read at call time)."""
    return (("autotp", AUTOTP_VERSION), ("torch", torch.__version__))


@dataclass(frozen=True, slots=True)
class RankFailure:
    """An exception a rank hit during set-up, in a form that travels to the other ranks."""

    rank: int
    error_type: str
    message: str

    @classmethod
    def of(cls, rank: int, exc: BaseException) -> RankFailure:
        return cls(rank, type(exc).__name__, str(exc))

    def line(self) -> str:
        return f"rank {self.rank} failed: {self.error_type}: {self.message}"


@dataclass(frozen=True, slots=True)
class GraphSummary:
    """What a rank captured, enough to say how two ranks' graphs differ."""

    fingerprint: str
    inputs: tuple[tuple[str, str], ...]  # (label, "int64[2,16]"): user inputs, parameters, buffers, constants

    @classmethod
    def of(cls, captured: CapturedGraph, space: StrategySpace) -> GraphSummary:
        values = {n.name: format_value(n.output_meta) for n in space.nodes}
        return cls(space_fingerprint(space), tuple((_input_label(gi), values.get(gi.node_name, "")) for gi in captured.inputs))


@dataclass(frozen=True, slots=True)
class Proposal:
    """Rank 0's half of the set-up: what it runs, and the plan every rank applies."""

    versions: tuple[tuple[str, str], ...]
    graph: GraphSummary | None  # None when rank 0's capture failed
    plan_json: str | None  # None when rank 0 failed, or was given a plan (each rank applies its own)
    failure: RankFailure | None


@dataclass(frozen=True, slots=True)
class RankReport:
    """One rank's outcome, gathered by every rank."""

    rank: int
    mismatches: tuple[str, ...]  # what differs from rank 0, each naming this rank
    plan_digest: str | None  # of the plan this rank would run; None when it has none
    failure: RankFailure | None


@dataclass(frozen=True, slots=True)
class SetupGroup:
    """A gloo group over the mesh's ranks whose collectives give up after ``timeout_s``."""

    group: dist.ProcessGroup
    ranks: tuple[int, ...]  # global ranks, in group order
    rank: int  # this process's rank in the group
    timeout_s: float

    def broadcast_from_first(self, obj: T | None, *, step: str) -> T:
        """``obj`` of group rank 0, on every rank; a monitored barrier first names absent ranks."""
        box = [obj]
        self._run(step, lambda: dist.monitored_barrier(self.group, timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True))
        self._run(step, lambda: dist.broadcast_object_list(box, src=self.ranks[0], group=self.group))
        return box[0]  # type: ignore[return-value]

    def all_gather(self, obj: T, *, step: str) -> list[T]:
        gathered: list[Any] = [None] * len(self.ranks)
        self._run(step, lambda: dist.all_gather_object(gathered, obj, group=self.group))
        return gathered

    def _run(self, step: str, collective: Callable[[], object]) -> None:
        try:
            collective()
        except RuntimeError as exc:  # gloo's timeout, or a peer that closed its connection
            _SETUP_GROUPS.pop((self.ranks, self.timeout_s), None)  # its queue may hold the stuck op
            raise _timeout_error(step, self.rank, self.ranks, self.timeout_s, exc) from exc


# (global ranks, timeout) -> (the default group it was made under, the set-up group). Kept, not
# destroyed: torch names a local-synchronised group by its ranks and the number of groups the
# process has, so destroying one and creating the next reuses the name and reads stale store keys.
_SETUP_GROUPS: dict[tuple[tuple[int, ...], float], tuple[dist.ProcessGroup | None, dist.ProcessGroup]] = {}


def check_mesh_groups(mesh: DeviceMesh) -> None:
    """A mesh outlives its process groups: after ``destroy_process_group`` it still holds their
    names, and torch's first use of one fails deep inside with "Could not resolve the process group"."""
    if not dist.is_initialized():
        raise ConfigError(
            "parallelize needs torch.distributed initialised, but it is not (never initialised, or "
            "destroy_process_group was called): call dist.init_process_group (torchrun sets its "
            "environment), then build the mesh with init_device_mesh"
        )
    for axis in range(mesh.ndim):
        try:
            mesh.get_group(axis)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"the mesh's process group of axis {axis} no longer exists ({exc}): it was destroyed "
                "after the mesh was built; build the mesh again with init_device_mesh after init_process_group"
            ) from None


def setup_group(mesh_ranks: Sequence[int], *, timeout_s: float) -> SetupGroup:
    """The set-up group of a mesh's ranks (global ranks, in mesh order), created once per default
    group and timeout.

    Only the mesh's ranks take part (``use_local_synchronization``), so a slice of a larger mesh
    works; its creation also gives up after ``timeout_s``.
    """
    ranks = tuple(int(r) for r in mesh_ranks)
    rank = ranks.index(dist.get_rank())
    world = dist.group.WORLD
    cached = _SETUP_GROUPS.get((ranks, timeout_s))
    if cached is not None and cached[0] is world:
        return SetupGroup(cached[1], ranks, rank, timeout_s)
    try:
        group = dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s), backend="gloo", use_local_synchronization=True)
    except RuntimeError as exc:
        raise _timeout_error("creating the set-up group", rank, ranks, timeout_s, exc) from exc
    _SETUP_GROUPS[(ranks, timeout_s)] = (world, group)
    return SetupGroup(group, ranks, rank, timeout_s)


def plan_digest(plan: Plan) -> str:
    """SHA-256 of the plan's JSON form but the solver's wall time: equal digests, equal plans.

    The same plan solved on every rank (the solver stops at a node limit, so it is the same
    everywhere) took each rank its own time; that must not make the ranks disagree."""
    data = plan.to_dict()
    data["solver"] = {**data["solver"], "seconds": None}
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def agree_on_plan(
    setup: SetupGroup,
    *,
    build_graph: Callable[[], tuple[CapturedGraph, StrategySpace]],
    solve: Callable[[StrategySpace], Plan],
    fit: Callable[[StrategySpace, Plan], Plan],
    given_plan: Plan | None,
) -> tuple[CapturedGraph, StrategySpace, Plan]:
    """This rank's graph and the plan every rank runs; raises alike on every rank if they disagree.

    ``build_graph`` runs on every rank; ``solve`` on rank 0 only, when no plan is given; ``fit``
    checks a plan against this rank's graph and returns it aligned (``PlanMismatchError`` if it
    does not fit).
    """
    rank = setup.rank
    captured: CapturedGraph | None = None
    space: StrategySpace | None = None
    graph: GraphSummary | None = None
    plan: Plan | None = None
    plan_json: str | None = None
    local_error: Exception | None = None
    mismatches: list[str] = []
    try:
        captured, space = build_graph()
        graph = GraphSummary.of(captured, space)
        if rank == 0:
            plan, plan_json = _root_plan(space, given_plan, solve=solve, fit=fit)
    except PlanMismatchError as exc:
        mismatches.append(f"rank {rank}: {exc}")
    except Exception as exc:  # noqa: BLE001 - carried to the other ranks, re-raised below
        local_error = exc

    root: Proposal | None = None
    if rank == 0:
        root = Proposal(library_versions(), graph, plan_json, RankFailure.of(0, local_error) if local_error is not None else None)
    proposal = setup.broadcast_from_first(root, step="receiving rank 0's plan")

    if rank != 0:
        mismatches.extend(_version_differences(rank, library_versions(), proposal.versions))
        if space is not None and graph is not None and proposal.graph is not None:
            try:
                plan, differs = _follow_root(rank, space, graph, proposal, proposal.graph, given_plan, fit=fit)
                mismatches.extend(differs)
            except PlanMismatchError as exc:
                mismatches.append(f"rank {rank}: {exc}")
            except Exception as exc:  # noqa: BLE001 - carried to the other ranks, re-raised below
                local_error = exc

    report = RankReport(
        rank, tuple(mismatches), plan_digest(plan) if plan is not None else None,
        RankFailure.of(rank, local_error) if local_error is not None else None,
    )
    reports = setup.all_gather(report, step="comparing the ranks' outcomes")
    settle(reports, local_error)
    assert captured is not None and space is not None and plan is not None  # settle raised otherwise
    return captured, space, plan


def _root_plan(
    space: StrategySpace, given_plan: Plan | None, *, solve: Callable[[StrategySpace], Plan], fit: Callable[[StrategySpace, Plan], Plan],
) -> tuple[Plan, str | None]:
    """Rank 0's plan, and its JSON form for the others when rank 0 solved it."""
    if given_plan is not None:
        return fit(space, given_plan), None
    plan_json = json.dumps(solve(space).to_dict())
    return Plan.from_dict(json.loads(plan_json)), plan_json  # rank 0 runs the plan as the others decode it


def _follow_root(
    rank: int, space: StrategySpace, graph: GraphSummary, root: Proposal, root_graph: GraphSummary, given_plan: Plan | None, *,
    fit: Callable[[StrategySpace, Plan], Plan],
) -> tuple[Plan | None, list[str]]:
    """On a rank other than 0: the plan it runs (None if rank 0 has none) and how its graph differs from rank 0's."""
    offered = given_plan
    if offered is None and root.plan_json is not None:
        offered = Plan.from_dict(json.loads(root.plan_json))
    differs = _graph_difference(rank, graph, root_graph, "planned" if given_plan is None else "has")
    if differs is not None:
        return None, [differs if offered is None else _with_first_op(differs, offered, space)]
    return (fit(space, offered) if offered is not None else None), []


def share_outcome(setup: SetupGroup, local_error: Exception | None, *, step: str) -> None:
    """Every rank learns whether any rank failed ``step`` and raises alike (``settle``), rather
    than one rank raising while the others go on to a collective it never reaches."""
    failure = RankFailure.of(setup.rank, local_error) if local_error is not None else None
    settle(setup.all_gather(RankReport(setup.rank, (), None, failure), step=step), local_error)


def settle(reports: list[RankReport], local_error: Exception | None) -> None:
    """Raise what every rank raises for these outcomes; return when all ranks agree and succeeded."""
    if local_error is not None:
        raise local_error
    mismatches = [line for report in reports for line in report.mismatches]
    root_digest = reports[0].plan_digest
    for report in reports[1:]:
        if not report.mismatches and None not in (root_digest, report.plan_digest) and report.plan_digest != root_digest:
            mismatches.append(
                f"rank {report.rank} was given another plan than rank 0 (plan digest {_short(report.plan_digest)}, "
                f"rank 0 {_short(root_digest)}); pass the same plan= to every rank, or none"
            )
    if mismatches:
        raise PlanMismatchError(
            "the ranks of the mesh disagree, so none was parallelized: " + "; ".join(mismatches)
            + ". Give every rank the same model, example inputs of the same shapes and dtypes (mark dims that vary with "
            "dynamic_dims=), and the same autotp and torch versions"
        )
    failures = [report.failure for report in reports if report.failure is not None]
    if failures:
        raise PeerRankError(
            "; ".join(f.line() for f in failures) + " during parallelize's set-up, so no rank was parallelized; "
            "the failing rank raised the original error (see its log)"
        )


def _input_label(gi: GraphInput) -> str:
    if gi.role is InputRole.USER_INPUT:
        return gi.node_name
    if gi.role is InputRole.CONSTANT or not gi.fqns:
        return f"{gi.role.value} '{gi.node_name}'"
    return f"{gi.role.value} '{gi.fqns[0]}'"


def _version_differences(rank: int, mine: tuple[tuple[str, str], ...], root: tuple[tuple[str, str], ...]) -> list[str]:
    theirs = dict(root)
    return [f"rank {rank}: {name} {version}, rank 0 runs {name} {theirs.get(name)}" for name, version in mine if theirs.get(name) != version]


def _graph_difference(rank: int, mine: GraphSummary, root: GraphSummary, verb: str) -> str | None:
    """``rank 1: input_ids is int64[2,8], rank 0 planned int64[2,16]``, or None for the same graph."""
    if mine.fingerprint == root.fingerprint:
        return None
    theirs = dict(root.inputs)
    ours = dict(mine.inputs)
    differs = [f"{label} is {value}, rank 0 {verb} {theirs[label]}" for label, value in mine.inputs if label in theirs and theirs[label] != value]
    differs += [f"{label} is {value}, rank 0 has no such input" for label, value in mine.inputs if label not in theirs]
    differs += [f"{label} is missing, rank 0 {verb} {value}" for label, value in root.inputs if label not in ours]
    if differs:
        return f"rank {rank}: " + ", ".join(differs)
    return f"rank {rank}: the same inputs and parameter shapes as rank 0 but another graph"


def _with_first_op(differs: str, plan: Plan, space: StrategySpace) -> str:
    """Name the first op that differs when the inputs alone do not explain it."""
    if not differs.endswith("but another graph"):
        return differs
    detail = describe_mismatch(plan, space)
    return differs if detail is None else f"{differs} ({detail})"


def _short(digest: str | None) -> str:
    return (digest or "none")[:19]


def _timeout_error(step: str, rank: int, ranks: tuple[int, ...], timeout_s: float, exc: BaseException) -> SetupTimeoutError:
    return SetupTimeoutError(
        f"rank {rank} of the mesh (global ranks {list(ranks)}): parallelize's set-up step '{step}' did not complete "
        f"within setup_timeout_s={timeout_s:g} s or lost a rank ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}). "
        "Another rank crashed, hangs, is still planning, or does not call parallelize: check its log; "
        "if rank 0's planning takes longer, raise setup_timeout_s"
    )
