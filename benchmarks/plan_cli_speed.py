"""How long `autotp plan gpt` takes to print its table, end to end, as a user runs it.

    python benchmarks/plan_cli_speed.py            # 3 runs
    python benchmarks/plan_cli_speed.py --runs 5 -- --mesh 4 --inference

Each run is the installed console script in a fresh process: interpreter start, imports,
capture of GPT-2 small on the meta device, the ILP, the replicate-all and Megatron-LM
baselines, and the table. The target is under 10 s on a 2-core machine. This is a benchmark,
not a timed test: it prints the measured seconds and says whether the target was met.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

TARGET_SECONDS = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="extra `autotp plan gpt` arguments (after --)")
    args = parser.parse_args()
    exe = shutil.which("autotp")
    if exe is None:
        print("the autotp console script is not installed (pip install -e .)", file=sys.stderr)
        return 2
    command = [exe, "plan", "gpt", *args.extra]
    seconds = []
    for run in range(args.runs):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0 or "totals (per step, per device)" not in done.stdout:
            print(f"run {run + 1} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        seconds.append(elapsed)
        print(f"run {run + 1}: {elapsed:.2f} s")
    median = statistics.median(seconds)
    print(f"`{' '.join(['autotp', *command[1:]])}`: median {median:.2f} s, best {min(seconds):.2f} s, worst {max(seconds):.2f} s "
          f"over {len(seconds)} runs ({'under' if median < TARGET_SECONDS else 'OVER'} the {TARGET_SECONDS:.0f} s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
