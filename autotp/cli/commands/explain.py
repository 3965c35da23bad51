"""``autotp explain TARGET --node NAME | --module PATH``: every candidate of a node, priced, and why one won."""
from __future__ import annotations

import argparse
import sys

from autotp.cli.commands.plan import add_planning_arguments, plan_target

_EPILOG = """\
examples:
  autotp explain gpt --module blocks.0.mlp.c_fc
  autotp explain gpt --node linear_4 --inference
  autotp explain mlp --mesh 4 --module layers.0.fc2

Node names are the graph's (see `autotp plan TARGET --format json`); module paths are the
model's (blocks.0.attn.q_proj). Costs are per step and per device; "inputs" prices converting
what the producers make into what the candidate reads, "outputs" what its consumers read.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show every candidate strategy of a node with its costs, and why the chosen one won",
        description="Plan TARGET (same options as `autotp plan`), then price every candidate strategy of one node "
        "(or of every node of one module) with its neighbours held at the plan's choices: its compute, the conversions "
        "its inputs need from the producers' placements, and the conversions its consumers would then need.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_planning_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--node", metavar="NAME", help="a graph node name, e.g. linear_4")
    which.add_argument("--module", metavar="PATH", help="a module path, e.g. blocks.0.mlp.c_fc: explains each of its nodes that has a choice")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotp.ir.units import fmt_nbytes, fmt_seconds
    from autotp.report.explain import explain_node, find_nodes, format_explanation
    from autotp.report.table import mode_text

    planned = plan_target(args)
    space, plan = planned.result.space, planned.result.plan
    nodes = find_nodes(space, node=args.node, module=args.module)
    budget = f"; memory budget {fmt_nbytes(plan.memory_budget)} per device (plan uses {fmt_nbytes(plan.memory_nbytes_per_device)})" if plan.memory_budget is not None else ""
    out = [
        f"autotp explain: {planned.target.model_name} ({planned.target.about})",
        f"mesh {plan.mesh_text()} on {plan.hardware}, {mode_text(plan)}; solver {plan.solver_status}{budget}",
        "costs per step and per device, every other node held at the plan's choice"
        + ("; collectives in full (the plan hides " + fmt_seconds(plan.hidden_seconds) + " behind compute: overlap)" if plan.hidden_seconds else ""),
    ]
    for node in nodes:
        out += ["", format_explanation(explain_node(space, plan, planned.cost, node.name))]
    sys.stdout.write("\n".join(out) + "\n")
    return 0
