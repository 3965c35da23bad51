"""Fuzz autotp with random models: forward, gradients, one AdamW step and buffers vs the original.

    python -m benchmarks.fuzz_equivalence --cases 300                  # seeds 0..299 over 2, 3 and 4 gloo ranks
    python -m benchmarks.fuzz_equivalence --cases 60 --world-sizes 3 --seed-start 1000
    python -m benchmarks.fuzz_equivalence --cases 60 --exclude ste running_stat embedding_scale_grad

Each seed is one ``autotp.testing.fuzz.FuzzModel``; seeds are dealt round-robin to the world
sizes and run in batches of ``--batch`` cases per set of spawned ranks (spawning costs seconds).
A batch whose ranks crash or hang is run again one case per spawn, so the case at fault is named
(as ``untyped``) and the others still count. Prints one line per case as it finishes, then a table
of outcomes per world size; exits 1 if any case is ``wrong`` or ``untyped`` (issue 21).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from autotp.testing import RankError, run_on_ranks
from autotp.testing.fuzz import BLOCK_NAMES, KINDS, Outcome, run_cases


def _run_batch(world_size: int, seeds: list[int], exclude: list[str], timeout_seconds: float) -> list[Outcome]:
    """The batch's outcomes; a batch that crashes or hangs is rerun seed by seed to name the culprit."""
    try:
        return run_on_ranks(run_cases, world_size, seeds, exclude=exclude, timeout_seconds=timeout_seconds * len(seeds))[0]
    except RankError as error:
        if len(seeds) == 1:
            first = str(error).strip().splitlines()
            detail = f"ranks crashed or hung: {first[0] if first else type(error).__name__} ... {first[-1] if first else ''}"
            return [Outcome(seed=seeds[0], world_size=world_size, model="?", kind="untyped", detail=detail[:400])]
        return [o for seed in seeds for o in _run_batch(world_size, [seed], exclude, timeout_seconds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--seed-start", type=int, default=0)
    parser.add_argument("--batch", type=int, default=10, help="cases per set of spawned ranks")
    parser.add_argument("--exclude", nargs="*", default=[], choices=BLOCK_NAMES, metavar="BLOCK", help="blocks never to pick")
    parser.add_argument("--case-timeout", type=float, default=120.0, help="seconds allowed per case")
    args = parser.parse_args(argv)

    seeds = range(args.seed_start, args.seed_start + args.cases)
    by_world = {w: [s for k, s in enumerate(seeds) if args.world_sizes[k % len(args.world_sizes)] == w] for w in args.world_sizes}
    outcomes: list[Outcome] = []
    start = time.monotonic()
    for world_size, world_seeds in by_world.items():
        for k in range(0, len(world_seeds), args.batch):
            for outcome in _run_batch(world_size, world_seeds[k : k + args.batch], args.exclude, args.case_timeout):
                outcomes.append(outcome)
                print(f"[{len(outcomes):>4}/{args.cases} {time.monotonic() - start:6.0f} s] {outcome.line()}", flush=True)
    _print_table(outcomes, args.world_sizes)
    return 1 if any(o.kind in ("wrong", "untyped") for o in outcomes) else 0


def _print_table(outcomes: list[Outcome], world_sizes: list[int]) -> None:
    counts = {w: Counter(o.kind for o in outcomes if o.world_size == w) for w in world_sizes}
    print(f"\n{'world':>5} " + " ".join(f"{k:>11}" for k in KINDS) + f" {'total':>7}")
    for w in world_sizes:
        print(f"{w:>5} " + " ".join(f"{counts[w][k]:>11}" for k in KINDS) + f" {sum(counts[w].values()):>7}")
    total = Counter(o.kind for o in outcomes)
    print(f"{'all':>5} " + " ".join(f"{total[k]:>11}" for k in KINDS) + f" {len(outcomes):>7}")


if __name__ == "__main__":
    sys.exit(main())
