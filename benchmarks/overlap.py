"""Step time with communication overlapped (``overlap=True``) against blocking collectives.

    python -m benchmarks.overlap                       # GPT and LLaMA, 4 gloo CPU ranks
    python -m benchmarks.overlap --models gpt --n-layer 2 --steps 10
    python -m benchmarks.overlap --backend nccl        # one GPU per rank (h100-sxm profile)

One run, the same processes, each example model (``autotp.examples``) with the same weights and
the same layout: Megatron-LM's (``autotp.solve.planner.megatron_plan``: attention and MLP
linears column/row parallel, the solver placing the rest), parallelized twice:

    off   ``overlap=False``: every collective blocks where it is emitted (issue 22's graph)
    on    ``overlap=True``: forward collectives start early and wait late, and the gradient
          all-reduce of each column-parallel input runs beside the weight-gradient matmuls
          (``autotp.comm.overlap``)

A step is ``zero_grad``, forward, cross-entropy loss, backward, between two barriers, timed on
every rank; a step takes as long as its slowest rank, and the table gives the median over steps,
stepped round-robin so machine noise falls on both alike. Beside the measured ratio on/off the
table prints the cost model's: the same layout priced with overlap off and on
(``CostModel(overlap=...)``, the profile of ``--hardware``), and the communication it predicts
hidden. Both variants' first-step losses must agree with the unsharded model's (else exit 1).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.capture.export import capture
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.ir.plan import Plan
from autotp.solve.build import build_plan
from autotp.solve.planner import megatron_plan
from autotp.strategies.engine import build_strategy_space
from autotp.testing import run_on_ranks
from benchmarks.tp_vs_dtensor import train_step

OPTIMIZER = "adamw"
LOSS_RTOL = 1e-4
VARIANTS = ("off", "on")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    models: tuple[str, ...]
    nproc: int
    backend: str
    width: int
    n_head: int
    n_layer: int
    vocab_size: int
    batch: int
    seq: int
    steps: int
    warmup: int
    hardware: str
    timeout_seconds: float

    def model_kwargs(self, name: str) -> dict[str, int]:
        if name == "gpt":
            return {"n_embd": self.width, "n_head": self.n_head, "n_layer": self.n_layer, "vocab_size": self.vocab_size, "block_size": self.seq}
        ffn_hidden = -(-(8 * self.width // 3) // 16) * 16  # LLaMA's 2/3 * 4 * dim, rounded up to a multiple of 16
        return {
            "dim": self.width, "n_heads": self.n_head, "n_kv_heads": self.n_head, "n_layers": self.n_layer,
            "vocab_size": self.vocab_size, "max_seq_len": self.seq, "ffn_hidden": ffn_hidden,
        }


@dataclass(frozen=True, slots=True)
class Predicted:
    """The cost model's step time of one layout with overlap off and on, and what it hides."""

    off_seconds: float
    on_seconds: float
    hidden_seconds: float
    comm_seconds: float  # all communication of the step, overlap off


@dataclass(frozen=True, slots=True)
class RankReport:
    losses: dict[str, dict[str, float]]  # model -> variant (and "reference") -> first-step loss
    step_seconds: dict[str, dict[str, list[float]]]  # model -> variant -> seconds per timed step
    predicted: dict[str, Predicted]
    layouts: dict[str, str]


def price_both_ways(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, tp_size: int, hardware: str) -> tuple[Plan, Predicted, str]:
    """Megatron's layout of ``model`` (solved with overlap on) and its price with overlap off and on."""
    space = build_strategy_space(capture(model, inputs), tp_size)
    profile = resolve_hardware(hardware)
    on_cost = CostModel(profile, space.mesh, training=True, optimizer=OPTIMIZER, overlap=True)
    plan, layout = megatron_plan(space, on_cost, hardware=profile.name)
    if plan is None:
        raise SystemExit(f"no Megatron layout in {type(model).__name__}: {layout}")
    chosen = {n.name: n.strategy for n in plan.nodes}
    off = build_plan(space, chosen, replace(on_cost, overlap=False), hardware=profile.name, memory_budget=None)
    hidden = sum(c.hidden_seconds for n in plan.nodes for c in n.conversions)
    comm = sum(n.comm_seconds for n in off.nodes)
    return plan, Predicted(off.total_seconds, plan.total_seconds, hidden, comm), layout


def run_rank(rank: int, world_size: int, config: BenchConfig) -> RankReport:
    device = torch.device("cuda", rank) if config.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world_size,))
    losses: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, list[float]]] = {}
    predicted: dict[str, Predicted] = {}
    layouts: dict[str, str] = {}
    for name in config.models:
        model, (idx,) = build_example(name, batch=config.batch, seq=config.seq, **config.model_kwargs(name))
        model.to(device)
        idx = idx.to(device)
        targets = torch.roll(idx, shifts=-1, dims=1)  # (B, T)
        planned = [price_both_ways(model, (idx,), tp_size=world_size, hardware=config.hardware) if rank == 0 else None]
        dist.broadcast_object_list(planned, src=0)  # one plan for every rank (the solver's timing is in it)
        plan, predicted[name], layouts[name] = planned[0]  # type: ignore[misc]
        modules = {variant: autotp.parallelize(model, mesh, (idx,), hardware=config.hardware, plan=plan, overlap=variant == "on") for variant in VARIANTS}
        losses[name] = {"reference": train_step(model, idx, targets).item()}
        losses[name].update({variant: train_step(m, idx, targets).item() for variant, m in modules.items()})
        seconds[name] = {variant: [] for variant in VARIANTS}
        for i in range(config.warmup + config.steps):
            for variant, module in modules.items():  # round-robin: drift and noise hit both alike
                dist.barrier()
                started = time.perf_counter()
                train_step(module, idx, targets)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dist.barrier()
                if i >= config.warmup:
                    seconds[name][variant].append(time.perf_counter() - started)
    return RankReport(losses, seconds, predicted, layouts)


def _median_ms(reports: Sequence[RankReport], model: str, variant: str) -> float:
    """Median over steps of the slowest rank's time, in milliseconds."""
    per_step = zip(*(r.step_seconds[model][variant] for r in reports))
    return statistics.median(max(step) for step in per_step) * 1e3


def report(config: BenchConfig, reports: Sequence[RankReport]) -> str:
    lines = [
        f"{config.nproc} {config.backend} ranks, width {config.width}, {config.n_head} heads, {config.n_layer} layers, "
        f"batch {config.batch} x seq {config.seq}, vocab {config.vocab_size}; profile {config.hardware}; "
        f"median of {config.steps} forward+backward steps (slowest rank)",
        "",
        "| model | off (ms) | on (ms) | measured on/off | predicted off (ms) | predicted on (ms) | predicted on/off | predicted comm hidden |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in config.models:
        off, on = _median_ms(reports, name, "off"), _median_ms(reports, name, "on")
        p = reports[0].predicted[name]
        hidden = f"{p.hidden_seconds * 1e3:.2f} of {p.comm_seconds * 1e3:.2f} ms"
        lines.append(
            f"| {name} | {off:.1f} | {on:.1f} | {on / off:.3f} | {p.off_seconds * 1e3:.1f} | {p.on_seconds * 1e3:.1f} | "
            f"{p.on_seconds / p.off_seconds:.3f} | {hidden} |"
        )
    lines += ["", *(f"{name} layout: {reports[0].layouts[name]}" for name in config.models)]
    return "\n".join(lines)


def check_correct(config: BenchConfig, reports: Sequence[RankReport]) -> list[str]:
    problems = []
    for rank, r in enumerate(reports):
        for name in config.models:
            reference = r.losses[name]["reference"]
            for variant in VARIANTS:
                loss = r.losses[name][variant]
                if abs(loss - reference) > LOSS_RTOL * max(1.0, abs(reference)):
                    problems.append(f"rank {rank}, {name}, overlap {variant}: first-step loss {loss} != unsharded {reference}")
    return problems


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("gpt", "llama"), default=["gpt", "llama"])
    parser.add_argument("--nproc", type=int, default=4, help="ranks (tp size)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="nccl: one GPU per rank")
    parser.add_argument("--width", type=int, default=256, help="n_embd (GPT) / dim (LLaMA)")
    parser.add_argument("--n-head", type=int, default=4, help="heads (LLaMA: also kv heads)")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--hardware", default=None, help="autotp hardware profile (default: cpu-gloo, h100-sxm with nccl)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the ranks are killed")
    args = parser.parse_args(argv)
    if args.n_head % args.nproc or args.vocab_size % args.nproc:
        parser.error(f"--n-head ({args.n_head}) and --vocab-size ({args.vocab_size}) must be divisible by --nproc ({args.nproc})")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return BenchConfig(
        models=tuple(args.models), nproc=args.nproc, backend=args.backend, width=args.width, n_head=args.n_head,
        n_layer=args.n_layer, vocab_size=args.vocab_size, batch=args.batch, seq=args.seq, steps=args.steps,
        warmup=args.warmup, hardware=args.hardware or ("h100-sxm" if args.backend == "nccl" else "cpu-gloo"),
        timeout_seconds=args.timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    started = time.perf_counter()
    reports = run_on_ranks(run_rank, config.nproc, config, timeout_seconds=config.timeout_seconds, backend=config.backend)
    print(report(config, reports))
    print(f"\n(wall time {time.perf_counter() - started:.1f} s)")
    problems = check_correct(config, reports)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
