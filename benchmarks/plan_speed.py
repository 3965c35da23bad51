"""How fast autotp plans LLaMA-2-7B and -70B shapes on the meta device (mesh of 8).

    python -m benchmarks.plan_speed            # the table below, each row in a fresh process
    python -m benchmarks.plan_speed --no-dedup # the same without solving repeated blocks once

Prints per model: graph nodes, ILP variables, seconds per stage (capture, strategies, solve,
plan total including building the model on meta) and peak RSS, then the 7B shape at 8, 16 and
32 layers to show how planning time grows with depth. Targets on a 2-core machine: 7B <= 10 s,
70B <= 20 s end to end, peak RSS <= 4 GiB, growth no worse than linear in depth.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LLAMA_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008, vocab_size=32000)
LLAMA_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672, vocab_size=32000)
ROWS = [
    ("llama-2-7b", LLAMA_7B),
    ("llama-2-70b", LLAMA_70B),
    ("7b x 8 layers", {**LLAMA_7B, "n_layers": 8}),
    ("7b x 16 layers", {**LLAMA_7B, "n_layers": 16}),
]
BATCH, SEQ, TP = 1, 4096, 8


def measure(config: dict, dedup: bool) -> dict:
    """Plan one model in this process, timing each stage."""
    from autotp.capture.export import capture
    from autotp.cost.model import CostModel, resolve_hardware
    from autotp.examples import build_example
    from autotp.solve.build import build_plan
    from autotp.solve.ilp import solve
    from autotp.strategies.engine import build_strategy_space

    started = time.perf_counter()
    model, inputs = build_example("llama", device="meta", batch=BATCH, seq=SEQ, max_seq_len=SEQ, **config)
    t_build = time.perf_counter()
    captured = capture(model, inputs)
    t_capture = time.perf_counter()
    space = build_strategy_space(captured, TP)
    t_strategies = time.perf_counter()
    cost = CostModel(resolve_hardware("h100-sxm"), TP, training=True, optimizer="adamw")
    solution = solve(space, cost, dedup=dedup, time_limit_s=600)
    t_solve = time.perf_counter()
    plan = build_plan(space, solution.chosen(space), cost, hardware="h100-sxm", memory_budget=None, status=solution.status)
    done = time.perf_counter()
    return {
        "nodes": len(space.nodes), "variables": solution.n_variables, "status": solution.status,
        "capture": t_capture - t_build, "strategies": t_strategies - t_capture, "solve": t_solve - t_strategies,
        "total": done - started, "estimate_s": plan.total_seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-dedup", action="store_true", help="do not solve repeated blocks once")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config (JSON) and print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one), dedup=not args.no_dedup)))
        return
    header = f"{'model':<16}{'nodes':>7}{'ILP vars':>10}{'capture s':>11}{'strategies s':>14}{'solve s':>9}{'total s':>9}{'peak RSS':>10}"
    print(f"planning on the meta device, mesh ({TP},), batch {BATCH} x seq {SEQ}, training (AdamW), h100-sxm, "
          f"dedup {'off' if args.no_dedup else 'on'}")
    print(header)
    print("-" * len(header))
    results = {}
    for name, config in ROWS:
        command = [sys.executable, "-m", "benchmarks.plan_speed", "--one", json.dumps(config)] + (["--no-dedup"] if args.no_dedup else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results[name] = r
        print(f"{name:<16}{r['nodes']:>7}{r['variables']:>10}{r['capture']:>11.2f}{r['strategies']:>14.2f}{r['solve']:>9.2f}{r['total']:>9.2f}{r['peak_rss_gib']:>8.2f} G", flush=True)
    per_layer = {n: results[n]["total"] for n in ("7b x 8 layers", "7b x 16 layers", "llama-2-7b")}
    print()
    print("growth with depth (7B shape): " + ", ".join(f"{n.split(' x ')[-1] if 'x' in n else '32 layers'}: {s:.2f} s" for n, s in per_layer.items()))
    ratio = per_layer["llama-2-7b"] / per_layer["7b x 8 layers"]
    print(f"32 layers / 8 layers = {ratio:.2f}x for 4x the depth ({'sub-linear' if ratio <= 4 else 'super-linear'})")
    print(f"targets: 7B {results['llama-2-7b']['total']:.1f} s (<= 10), 70B {results['llama-2-70b']['total']:.1f} s (<= 20), "
          f"peak RSS {max(r['peak_rss_gib'] for r in results.values()):.2f} GiB (<= 4)")


if __name__ == "__main__":
    main()
