"""``autotp verify TARGET``: run TARGET sharded on local CPU ranks and unsharded, and compare.

TARGET resolves as for ``autotp plan`` (a built-in example, ``package.module:function`` or
``path/to/file.py:function``), with real weights on the CPU: a function that takes ``device`` is
called with ``device="cpu"``, and the built-in examples are built at their small test sizes
(``--config`` and ``--input`` scale them), since verify trains them one step on the CPU.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autotp.io.target import InputSpec

_EPILOG = """\
examples:
  autotp verify mlp
  autotp verify gpt --mesh 4 --inference
  autotp verify mlp --mesh 2x2 --mesh-axis-names dp,tp
  autotp verify llama --plan llama.plan.json
  autotp verify mymodels.py:build --input input_ids:int64[2,64]

exit status: 0 when the sharded model matches the original (also when the plan splits nothing,
which the table then says), 1 when it does not or a rank fails, 2 on a usage error.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from autotp.cli.commands.plan import add_mesh_arguments

    parser = subparsers.add_parser(
        "verify",
        help="run a model sharded on local CPU ranks and unsharded, and compare outputs, gradients and an optimizer step",
        description="Plan TARGET (or apply --plan), run it sharded on N local CPU ranks over gloo (a mesh of any number of axes, --mesh 2x2) and unsharded in this "
        "process, and compare every output, and when training every gradient and every parameter after one AdamW step, "
        "within dtype-aware tolerances. Prints a table; see docs/verify.md.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="TARGET", help="gpt | llama | mlp | package.module:function | path/to/file.py:function")
    add_mesh_arguments(parser, default="2")
    parser.add_argument("--plan", metavar="FILE", help="verify a plan saved with `autotp plan --format json` instead of planning")
    parser.add_argument(
        "--memory-budget", "--budget", dest="memory_budget", metavar="BYTES",
        help="memory per device to plan for, e.g. 1MiB (default: 1.3/N of the replicated model's state, which forces splitting)",
    )
    parser.add_argument("--hardware", default="cpu-gloo", metavar="NAME|PATH", help="hardware profile to plan for (default: cpu-gloo)")
    parser.add_argument("--inference", dest="training", action="store_false", help="compare outputs only (default: also gradients and one AdamW step)")
    parser.add_argument(
        "--input", action="append", default=[], metavar="NAME:DTYPE[SHAPE]",
        help="an example input, e.g. input_ids:int64[2,64] (floats are drawn from N(0,1), integers from {0, 1})",
    )
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="override a built-in example's config field (or pass a keyword to the target function); repeatable")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="limit for the sharded run (default: 600)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the planner does")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotp.cli.commands.plan import mesh_choice
    from autotp.io.target import parse_config, parse_input
    from autotp.ir.plan import Plan
    from autotp.runtime.verify import RebuiltModel, verify_source

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    plan = Plan.load(args.plan) if args.plan else None
    choice = mesh_choice(args, plan, (2,))
    mesh = choice.mesh
    inputs = tuple(parse_input(text) for text in args.input)
    config = parse_config(args.config)
    model, example_inputs = build_target(args.target, inputs, config)
    source = RebuiltModel(build_target_model, (args.target, inputs, config), model.state_dict())
    where = f" as the mesh {mesh}" if mesh.ndim > 1 else ""
    print(f"autotp verify: running {type(model).__name__} on {mesh.size} CPU ranks{where} and unsharded ...", file=sys.stderr, flush=True)
    report = verify_source(
        source, model, example_inputs, mesh_shape=mesh.shape, mesh_axis_names=mesh.names, inter_node_axes=mesh.inter_node_axes,
        axis_roles=choice.axis_roles, plan=plan, training=args.training, memory_budget=args.memory_budget,
        hardware=args.hardware, optimizer="adamw", timeout_seconds=args.timeout, graph_hook=None,
    )
    print(report)
    return 0 if report.passed else 1


def build_target(spec: str, inputs: Sequence[InputSpec], config: Mapping[str, Any]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """TARGET with real weights on the CPU and its example inputs (see the module docstring)."""
    import torch

    from autotp.errors import ConfigError
    from autotp.examples import EXAMPLES, build_example
    from autotp.io.target import load_target

    if spec in EXAMPLES:
        sizes = {"batch": inputs[0].shape[0], "seq": inputs[0].shape[1]} if len(inputs) == 1 and len(inputs[0].shape) >= 2 else {}
        try:
            return build_example(spec, device="cpu", **sizes, **config)  # type: ignore[arg-type]  # sizes are the int size keywords
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot build the '{spec}' example: {exc}") from exc
    target = load_target(spec, inputs=inputs, config=config, device="cpu")
    example_inputs = target.example_inputs
    if inputs:  # load_target's are zeros: draw values that exercise every weight
        gen = torch.Generator().manual_seed(0)
        example_inputs = tuple(
            torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.dtype.is_floating_point else torch.randint(0, 2, t.shape, generator=gen, dtype=t.dtype)
            for t in example_inputs
        )
    return target.model, example_inputs


def build_target_model(spec: str, inputs: Sequence[InputSpec], config: Mapping[str, Any]) -> nn.Module:
    """The model of ``build_target``, rebuilt inside a rank (which then loads the parent's weights)."""
    return build_target(spec, inputs, config)[0]
