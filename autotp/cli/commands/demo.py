"""``autotp demo``: shard a built-in example over local CPU ranks and check it against the original."""
from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="shard a built-in example over local CPU ranks (gloo) and compare with the original",
        description="Spawns N CPU ranks over gloo on 127.0.0.1, parallelizes a built-in example under a "
        "memory budget that forces splitting, runs it, and prints the plan and the largest difference "
        "from the unsharded model.",
    )
    parser.add_argument("--example", default="gpt", choices=["gpt", "llama", "mlp"], help="built-in model (default: gpt)")
    parser.add_argument("--nproc", type=int, default=4, help="number of CPU ranks (default: 4)")
    parser.add_argument(
        "--budget-fraction", type=float, default=None,
        help="per-device parameter memory budget as a fraction of the whole model "
        "(default: 1.3/nproc, which forces the weights to be split)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotp.runtime.demo import demo_rank
    from autotp.testing import RankError, run_on_ranks

    if args.nproc < 1:
        print("autotp: error: --nproc must be at least 1", file=sys.stderr)
        return 2
    fraction = args.budget_fraction if args.budget_fraction is not None else min(1.0, 1.3 / args.nproc)
    if fraction < 1 / args.nproc:
        print(f"autotp: error: --budget-fraction {fraction} is below 1/{args.nproc}: no split of the weights fits it", file=sys.stderr)
        return 2
    print(f"autotp demo: parallelizing the '{args.example}' example on {args.nproc} CPU ranks over gloo ...", flush=True)
    started = time.perf_counter()
    try:
        reports = run_on_ranks(demo_rank, args.nproc, args.example, fraction, timeout_seconds=600)
    except RankError as exc:
        print(f"autotp: error: a rank failed:\n{exc}", file=sys.stderr)
        return 1
    first = reports[0]
    print(first.summary)
    print()
    worst = max(r.max_abs_diff for r in reports)
    print(f"rank 0 holds {first.local_params:,} of {first.full_params:,} parameters; {first.collectives} collectives in its forward graph")
    print(f"max |sharded - original| over {args.nproc} ranks: {worst:.3e} ({time.perf_counter() - started:.1f}s)")
    ok = worst <= 1e-4
    print("OK: the sharded model matches the original" if ok else "MISMATCH: the sharded model differs from the original")
    return 0 if ok else 1
