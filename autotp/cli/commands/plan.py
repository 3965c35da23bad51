"""``autotp plan TARGET``: plan a model offline and show, save or hand over the plan.

The planning options (``--mesh``, ``--hardware``, ``--input``, ``--memory-budget``, ...) are
shared with ``autotp explain`` through ``add_planning_arguments`` and ``plan_target``.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from cost_models import HardwareProfile
    from autotp.api import PlanningResult
    from autotp.cost.model import CostModel
    from autotp.io.target import Target
    from autotp.ir.mesh import MeshSpec
    from autotp.ir.plan import Plan
    from autotp.report.progress import ProgressEvent

_START = time.perf_counter()  # the CLI imports every command at start-up: about when the process began

FORMATS = ("table", "json", "dot", "html", "torch-tp")

_EPILOG = """\
targets:
  gpt, llama, mlp              built-in examples at useful sizes (GPT-2 small at 8 x 1024 tokens, ...)
  package.module:function      a function returning a model, or (model, example_inputs)
  path/to/file.py:function     the same, from a file
  A function that takes a `device` argument is called with device="meta" (no memory used).

examples:
  autotp plan gpt
  autotp plan gpt --mesh 4 --memory-budget 1GiB --format html --out plan.html
  autotp plan llama --inference --format json --out llama.plan.json
  autotp plan mymodels.py:build --input input_ids:int64[8,2048] --hardware a100-pcie
  autotp plan mlp --mesh 2 --format torch-tp --out tp_plan.py
  autotp plan mlp --mesh 2x2 --mesh-axis-names dp,tp --axis-role dp=data --format json --out mlp.plan.json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan a model offline and print, save or export the plan",
        description="Capture TARGET on the meta device, plan it for a mesh of any number of axes (--mesh 8, --mesh 2x4) and write the plan: "
        "a table grouped by module (default), the JSON plan file autotp.Plan.load reads, Graphviz dot, a self-contained "
        "HTML page, or a PyTorch parallelize_module plan (torch-tp).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_planning_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--out", metavar="FILE", help="write the output to FILE instead of stdout (torch-tp: .py for Python, else JSON)")
    parser.add_argument("--no-baselines", action="store_true", help="do not price replicate-all and Megatron-LM for comparison")
    parser.set_defaults(func=run)


def add_planning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help="gpt | llama | mlp | package.module:function | path/to/file.py:function")
    add_mesh_arguments(parser, default="8")
    parser.add_argument("--hardware", default="h100-sxm", metavar="NAME|PATH", help="hardware profile name or TOML file (default: h100-sxm)")
    parser.add_argument(
        "--input", action="append", default=[], metavar="NAME:DTYPE[SHAPE]",
        help="an example input, e.g. input_ids:int64[8,2048]; repeat for each forward() argument "
        "(built-in examples have defaults)",
    )
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="override a built-in example's config field (or pass a keyword to the target function); repeatable")
    parser.add_argument(
        "--memory-budget", metavar="BYTES",
        help="memory per device, e.g. 40GiB (default: no limit; built-in examples: 1.3/N of the replicated model, which forces splitting)",
    )
    parser.add_argument("--no-budget", action="store_true", help="plan built-in examples without their default memory budget")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--training", dest="training", action="store_true", default=True, help="plan for training: forward + backward, gradients and optimizer state (default)")
    mode.add_argument("--inference", dest="training", action="store_false", help="plan for inference: forward only, parameters only")
    parser.add_argument("--optimizer", default="adamw", help="optimizer whose state the memory budget counts when training (default: adamw; 'none' for none)")
    parser.add_argument(
        "--no-overlap", dest="overlap", action="store_false", default=True,
        help="price every collective in full, as if none ran beside compute (default: communication hidden behind independent compute is not charged)",
    )
    parser.add_argument(
        "--plan", metavar="FILE",
        help="use a plan saved with --format json instead of solving; it is checked against TARGET (graph fingerprint)",
    )
    parser.add_argument(
        "--time-limit", type=float, default=60.0, metavar="SECONDS",
        help="solver safety net: past it a deterministic fallback plan is returned with a warning (default: 60)",
    )
    parser.add_argument(
        "--node-limit", type=int, default=None, metavar="N",
        help="branch-and-bound nodes the solver may explore: the same plan on every machine, with its gap if not proven optimal "
        "(default: autotp.solve.ilp.NODE_LIMIT)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the planner does")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress", dest="progress", action="store_true", default=None,
        help="show each stage (capture, strategies, solve with its incumbents, build, baselines) and its time on stderr "
        "(default: only when stderr is a terminal)",
    )
    shown.add_argument("-q", "--quiet", dest="progress", action="store_false", help="show no progress, even on a terminal")


def add_mesh_arguments(parser: argparse.ArgumentParser, *, default: str) -> None:
    """``--mesh``, ``--mesh-axis-names``, ``--axis-role`` and ``--inter-node-axes`` (``plan``, ``explain``, ``verify``)."""
    parser.add_argument(
        "--mesh", default=None, metavar="N|AxB",
        help=f"ranks per mesh axis: 8 for one tensor-parallel axis, 2x4 for 2 groups of 4 (default: {default}, or the --plan file's)",
    )
    parser.add_argument(
        "--mesh-axis-names", default=None, metavar="NAMES",
        help="comma-separated mesh axis names, one per axis, e.g. dp,tp (default: tp on a 1-D mesh, axis0,axis1,... otherwise)",
    )
    parser.add_argument(
        "--axis-role", action="append", default=[], metavar="AXIS=ROLE",
        help="pin what parameters do on a mesh axis: any (the solver's choice), data (replicated: data parallelism) or fsdp (split); "
        "e.g. dp=data; repeatable (default: any)",
    )
    parser.add_argument(
        "--inter-node-axes", default=None, metavar="AXES",
        help="comma-separated mesh axes whose groups span nodes, e.g. dp (default: decided by the hardware profile's devices per node)",
    )


@dataclass(frozen=True, slots=True)
class MeshChoice:
    """The mesh the command line asks for, and the axis roles to plan it with."""

    mesh: MeshSpec
    axis_roles: dict[int | str, str]


def mesh_choice(args: argparse.Namespace, saved: Plan | None, default: tuple[int, ...]) -> MeshChoice:
    """The mesh of ``--mesh`` and its companions; a saved plan's mesh where they are not given.
    ``ConfigError`` naming the flag on a value that cannot be read or does not fit the mesh."""
    from autotp.errors import ConfigError
    from autotp.ir.mesh import MeshSpec
    from autotp.strategies.engine import AxisRole

    roles_known = tuple(r.value for r in AxisRole)
    shape = parse_mesh(args.mesh) if args.mesh is not None else tuple(saved.mesh_shape) if saved is not None else default
    names: tuple[str, ...] | None = None
    if args.mesh_axis_names is not None:
        names = tuple(n.strip() for n in args.mesh_axis_names.split(","))
        if len(names) != len(shape) or len(set(names)) != len(names) or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names):
            raise ConfigError(
                f"cannot read --mesh-axis-names {args.mesh_axis_names!r}: expected {len(shape)} distinct comma-separated names "
                f"(letters, digits, _), one per axis of the mesh {'x'.join(map(str, shape))}, such as {','.join(_example_names(len(shape)))}"
            )
    elif saved is not None and tuple(saved.mesh_shape) == shape:
        names = tuple(saved.mesh_axis_names)
    mesh = MeshSpec.of(shape, names)
    if saved is not None and tuple(saved.mesh_shape) == shape and mesh.names != tuple(saved.mesh_axis_names):
        raise ConfigError(f"--mesh-axis-names {','.join(mesh.names)}: the --plan file names its mesh axes {','.join(saved.mesh_axis_names)}; leave the flag out")
    if args.inter_node_axes is not None:
        axes = [_axis_of(text.strip(), mesh, f"--inter-node-axes {args.inter_node_axes}") for text in args.inter_node_axes.split(",") if text.strip()]
        mesh = MeshSpec.of(mesh.shape, mesh.names, inter_node_axes=axes)
    elif saved is not None and tuple(saved.mesh_shape) == shape:
        mesh = saved.mesh
    roles: dict[int | str, str] = {}
    for text in args.axis_role:
        axis, sep, role = (part.strip() for part in text.partition("="))
        if not sep or not axis or role not in roles_known:
            raise ConfigError(f"cannot read --axis-role {text!r}: expected AXIS=ROLE such as {mesh.names[0]}=data, with ROLE one of {', '.join(roles_known)}")
        roles[mesh.names[_axis_of(axis, mesh, f"--axis-role {text}")]] = role
    return MeshChoice(mesh, roles)


def _axis_of(text: str, mesh: MeshSpec, flag: str) -> int:
    """A mesh axis by name (or index), for ``flag``'s error message."""
    from autotp.errors import ConfigError

    if text in mesh.names:
        return mesh.names.index(text)
    if text.isdigit() and int(text) < mesh.ndim:
        return int(text)
    raise ConfigError(f"{flag}: no mesh axis {text!r}; the mesh {mesh} has axes {', '.join(mesh.names)} (name them with --mesh-axis-names)")


def _example_names(ndim: int) -> tuple[str, ...]:
    return ("tp",) if ndim == 1 else ("dp", "tp") if ndim == 2 else tuple(f"axis{a}" for a in range(ndim))


@dataclass(frozen=True, slots=True)
class Planned:
    target: Target
    result: PlanningResult
    cost: CostModel
    memory_budget: int | None
    seconds: float


def parse_mesh(text: str) -> tuple[int, ...]:
    from autotp.errors import ConfigError

    if not re.fullmatch(r"\s*\d+(\s*[xX×]\s*\d+)*\s*", text):
        raise ConfigError(f"cannot read --mesh {text!r}: expected ranks per mesh axis such as 8 or 2x4")
    shape = tuple(int(d) for d in re.split(r"[xX×]", text))
    if min(shape) < 1:
        raise ConfigError(f"--mesh must be at least 1 on every axis, got {text.strip()}")
    return shape


def plan_target(args: argparse.Namespace) -> Planned:
    """Load the target and plan it as the shared options say."""
    from autotp.api import plan_model
    from autotp.cost.model import CostModel, resolve_hardware
    from autotp.io.target import (
        builtin_memory_budget,
        load_target,
        parse_config,
        parse_input,
    )
    from autotp.ir.plan import Plan
    from autotp.ir.units import parse_nbytes

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    started = time.perf_counter()
    saved = Plan.load(args.plan) if args.plan else None
    choice = mesh_choice(args, saved, (8,))
    mesh = choice.mesh
    profile = resolve_hardware(args.hardware)
    budget = parse_nbytes(args.memory_budget)
    inputs = [parse_input(text) for text in args.input]
    optimizer = None if str(args.optimizer).lower() == "none" else args.optimizer
    target = load_target(args.target, inputs=inputs, config=parse_config(args.config))
    if saved is not None:
        return _saved(saved, target, mesh, profile, started)
    if budget is None and target.builtin is not None and not args.no_budget:
        budget = builtin_memory_budget(target.model, mesh.size, training=args.training, optimizer=optimizer)
    result = plan_model(
        target.model, target.example_inputs, mesh_shape=mesh.shape, mesh_axis_names=mesh.names, inter_node_axes=mesh.inter_node_axes,
        axis_roles=choice.axis_roles, hardware=profile, memory_budget=budget,
        training=args.training, optimizer=optimizer, time_limit_s=args.time_limit, progress=progress_printer(args), overlap=args.overlap,
        **({"node_limit": args.node_limit} if args.node_limit is not None else {}),
    )
    cost = CostModel(profile, result.plan.mesh, training=args.training, optimizer=optimizer if args.training else None, overlap=args.overlap)
    return Planned(target, result, cost, budget, time.perf_counter() - started)


class StageLines:
    """Prints planning progress on ``stream``: one line per stage with its time when it ends.

    On a terminal the running stage's line is redrawn in place every ``tick_seconds`` with its
    elapsed time and latest news (the solver's incumbent and bound). Elsewhere (``--progress``
    into a log) every start, update and end is its own line, and nothing ticks.
    """

    def __init__(self, stream: TextIO, *, tick_seconds: float = 1.0) -> None:
        self.stream, self.tick_seconds = stream, tick_seconds
        self.live = stream.isatty()
        self.lock = threading.Lock()  # news comes from the solver's log-reading thread and the ticker
        self.running: ProgressEvent | None = None  # the stage now running, with its latest news
        self.started = 0.0
        self.stage_ended = threading.Event()  # stops the ticker

    def __call__(self, event: ProgressEvent) -> None:
        with self.lock:
            if event.state == "end":
                self.running = None
                self.stage_ended.set()
                self._write(f"autotp: {event.stage} {event.seconds:.2f}s" + (f" ({event.detail})" if event.detail else ""), end=True)
                return
            self.running, self.started = event, time.perf_counter() - event.seconds
            self._write(self._running_text(event.seconds), end=not self.live)
            if event.state == "start" and self.live:
                self.stage_ended.clear()
                threading.Thread(target=self._tick, args=(event.stage,), daemon=True).start()

    def _running_text(self, seconds: float) -> str:
        event = self.running
        assert event is not None
        news = f" {event.detail}" if event.detail else ""
        return f"autotp: {event.stage} ...{news} ({seconds:.1f}s)" if event.state == "update" or self.live else f"autotp: {event.stage} ..."

    def _tick(self, stage_name: str) -> None:
        while not self.stage_ended.wait(self.tick_seconds):
            with self.lock:
                if self.running is None or self.running.stage != stage_name:
                    return
                self._write(self._running_text(time.perf_counter() - self.started), end=False)

    def _write(self, text: str, *, end: bool) -> None:
        self.stream.write(("\r\033[K" if self.live else "") + text + ("\n" if end else ""))
        self.stream.flush()


def progress_printer(args: argparse.Namespace) -> StageLines | None:
    """Stage lines on stderr with ``--progress``, or by default when stderr is a terminal; none with ``--quiet``."""
    wanted = args.progress if args.progress is not None else sys.stderr.isatty()
    return StageLines(sys.stderr) if wanted else None


def _saved(plan: Plan, target: Target, mesh: MeshSpec, profile: HardwareProfile, started: float) -> Planned:
    """A saved plan checked against the target; priced for baselines with the plan's own settings."""
    from autotp.api import _apply_plan
    from autotp.cost.model import CostModel, resolve_hardware
    from autotp.errors import AutoTPError

    result = _apply_plan(target.model, target.example_inputs, plan, mesh)
    try:
        profile = resolve_hardware(plan.hardware)
    except AutoTPError:  # a profile file the plan names but this machine lacks: use --hardware
        pass
    cost = CostModel(profile, mesh, training=plan.training, optimizer=plan.optimizer if plan.training else None, overlap=plan.overlap)
    return Planned(target, result, cost, plan.memory_budget, time.perf_counter() - started)


def run(args: argparse.Namespace) -> int:
    from autotp.io.plan_io import dumps_plan
    from autotp.io.torch_tp_export import dumps_torch_tp
    from autotp.report import render
    from autotp.report.progress import stage
    from autotp.report.table import format_table, price_baselines

    planned = plan_target(args)
    plan = planned.result.plan
    baselines = []
    if not args.no_baselines and args.format in ("table", "html"):
        with stage(progress_printer(args), "baselines"):
            baselines = price_baselines(planned.result.space, planned.cost, hardware=plan.hardware, memory_budget=planned.memory_budget)
    title = f"autotp plan: {planned.target.model_name} ({planned.target.about})"
    source = {"target": planned.target.spec, "model": planned.target.model_name}
    if args.format == "table":
        text = format_table(plan, baselines, title=title) + "\n"
    elif args.format == "json":
        text = dumps_plan(plan, source=source)
    elif args.format == "dot":
        text = render.to_dot(plan, title=title)
    elif args.format == "html":
        text = render.to_html(plan, baselines, title=title)
    else:
        text = dumps_torch_tp(
            plan, model=planned.target.model, example_inputs=planned.target.example_inputs,
            python=bool(args.out and args.out.endswith(".py")), title=title,
        )
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            print(f"autotp: error: cannot write {args.out!r}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"autotp plan: wrote {args.format} to {args.out} ({time.perf_counter() - _START:.1f}s)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
