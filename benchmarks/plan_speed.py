"""How fast autotp plans LLaMA-2-7B and -70B shapes on the meta device (mesh of 8).

    python -m benchmarks.plan_speed            # the table below, each row in a fresh process
    python -m benchmarks.plan_speed --no-dedup # the same without solving repeated blocks once
    python -m benchmarks.plan_speed --budget   # planning under a memory budget beside without one

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


# Budget rows: each model planned without a budget and with one, in the same fresh process, so the
# two times share the machine's load. Toy Hugging Face decoders (2 layers, hidden 64, 4 heads, 2
# key/value heads) on 2 ranks for inference under 0.6x their parameter bytes, on the default
# hardware and on cpu-gloo (dear collectives: the harder ILP); the LLaMA-3-8B and -2-70B shapes on
# a mesh of 8, training with AdamW, batch 8 x 2048, under 1.3x their smallest state per device.
LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256)
TOY_FAMILIES = ("llama", "qwen2", "mistral", "phi3")
BUDGET_ROWS = [
    *({"toy": family, "hardware": hardware} for family in TOY_FAMILIES for hardware in ("h100-sxm", "cpu-gloo")),
    {"shape": "llama-3-8b", "hardware": "h100-sxm"},
    {"shape": "llama-2-70b", "hardware": "h100-sxm"},
]


def _toy_decoder(family: str) -> tuple:
    import torch
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[family]
    config = config_class(
        hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=256, max_position_embeddings=64, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    return model, (torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(1)),)


def measure_budget(row: dict) -> dict:
    """Plan one row without a budget and with one, timing capture + strategies + solve each time."""
    import warnings

    from autotp.capture.export import capture
    from autotp.cost.model import CostModel, resolve_hardware
    from autotp.examples import build_example
    from autotp.solve.ilp import min_state_nbytes, solve
    from autotp.strategies.engine import build_strategy_space

    warnings.simplefilter("ignore")
    if "toy" in row:
        model, inputs = _toy_decoder(row["toy"])
        tp, cost = 2, CostModel(resolve_hardware(row["hardware"]), 2, training=False, optimizer=None)
        budget_of = lambda space: 0.6 * sum(p.numel() * p.element_size() for p in model.parameters())  # noqa: E731
    else:
        config = LLAMA3_8B if row["shape"] == "llama-3-8b" else LLAMA_70B
        model, inputs = build_example("llama", device="meta", batch=8, seq=2048, max_seq_len=2048, **config)
        tp, cost = TP, CostModel(resolve_hardware(row["hardware"]), TP, training=True, optimizer="adamw")
        budget_of = lambda space: 1.3 * min_state_nbytes(space, cost)  # noqa: E731
    result = {}
    for label in ("none", "budget"):
        started = time.perf_counter()
        space = build_strategy_space(capture(model, inputs), tp)
        t_space = time.perf_counter()
        solution = solve(space, cost, memory_budget=budget_of(space) if label == "budget" else None)
        done = time.perf_counter()
        result[label] = {"plan": done - started, "solve": done - t_space, "status": solution.status}
    return result


def budget_main() -> None:
    print("planning (capture + strategies + solve) without and with a memory budget, CBC, each row in a fresh process")
    header = f"{'model':<28}{'hardware':<10}{'no budget s':>12}{'budget s':>10}{'ratio':>7}{'budget solve s':>16}  status"
    print(header)
    print("-" * len(header))
    for row in BUDGET_ROWS:
        command = [sys.executable, "-m", "benchmarks.plan_speed", "--one-budget", json.dumps(row)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        name = f"{row['toy']} (toy) 0.6x params" if "toy" in row else f"{row['shape']} 1.3x min"
        none, budget = r["none"], r["budget"]
        print(f"{name:<28}{row['hardware']:<10}{none['plan']:>12.2f}{budget['plan']:>10.2f}{budget['plan'] / none['plan']:>6.2f}x"
              f"{budget['solve']:>16.2f}  {budget['status']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-dedup", action="store_true", help="do not solve repeated blocks once")
    parser.add_argument("--budget", action="store_true", help="the budget rows: each model without and with a memory budget")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config (JSON) and print JSON
    parser.add_argument("--one-budget", help=argparse.SUPPRESS)  # internal: measure one budget row (JSON)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one), dedup=not args.no_dedup)))
        return
    if args.one_budget:
        print(json.dumps(measure_budget(json.loads(args.one_budget))))
        return
    if args.budget:
        budget_main()
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
