"""Forward+backward step time of autotp against PyTorch's own tensor parallelism (DTensor).

    python -m benchmarks.tp_vs_dtensor                 # 4 gloo CPU ranks, default GPT
    python benchmarks/tp_vs_dtensor.py --n-layer 2 --steps 10 --profile

One run, the same processes, the same GPT example (``autotp.examples``) with the same weights,
five variants stepped round-robin so that machine noise falls on all of them alike:

    reference           the unsharded model, replicated on every rank
    autotp megatron     autotp's ILP pinned to the hand plan's layout: q/k/v/c_fc column,
                        attn.c_proj/mlp.c_proj row, everything outside attn/mlp replicated
    autotp planned      autotp's own plan under a memory budget of about 1/tp of the training
                        state (weights, gradients, AdamW moments)
    dtensor             ``parallelize_module`` with ColwiseParallel on q/k/v/c_fc and
                        RowwiseParallel on attn.c_proj/mlp.c_proj; the rest replicated
    dtensor torchtitan  the same plus torchtitan's ``PrepareModuleInput`` on the attention,
                        so q/k/v share one input DTensor: Megatron's (and autotp's) collectives

A step is ``zero_grad``, forward, cross-entropy loss, backward, between two barriers; a step
takes as long as its slowest rank, and the table reports the median over steps, the CPU time a
rank spends in the step (its work, not its waits: with more ranks than cores every rank's work
delays the others), the collectives one step issues (``CommDebugMode``) and one bare
all-reduce for scale. Each TP
variant's first-step loss and gradients must match the reference's (``LOSS_ATOL``,
``GRAD_ATOL``), else the script exits 1: the timings compare correct programs.

Target (from the issue): autotp (Megatron layout) <= 0.90 x the DTensor step time, since the
rewritten graph calls collectives directly and pays no DTensor dispatch.
"""
from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import tensor as dtensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

import autotp
from autotp.capture.export import capture
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.examples.gpt import CausalSelfAttention
from autotp.ir.placement import Replicate
from autotp.ir.plan import Plan
from autotp.ir.strategy import MeshStrategy
from autotp.solve.layouts import megatron_pins
from autotp.solve.memory import min_state_nbytes
from autotp.solve.planner import solve_plan
from autotp.strategies.engine import NodeKind, StrategySpace, build_strategy_space
from autotp.testing import run_on_ranks

# The acceptance bar: autotp (Megatron layout) / DTensor step time.
TARGET_RATIO = 0.90
# First-step losses and gradients must agree this closely (fp32; split reductions reorder sums).
LOSS_ATOL = 1e-4
GRAD_ATOL = 1e-5
# The optimizer autotp prices gradients and state for (its default); the benchmark runs none.
OPTIMIZER = "adamw"
# The variant every ratio is taken against.
BASELINE = "dtensor"
VARIANTS = ("reference", "autotp megatron", "autotp planned", "dtensor", "dtensor torchtitan")
# The bare all-reduce timed alongside the variants, for scale.
ALL_REDUCE = "all_reduce"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    nproc: int
    n_embd: int
    n_head: int
    n_layer: int
    vocab_size: int
    batch: int
    seq: int
    steps: int
    warmup: int
    budget_factor: float
    hardware: str
    profile: bool
    timeout_seconds: float

    def model_kwargs(self) -> dict[str, int]:
        return {
            "n_embd": self.n_embd, "n_head": self.n_head, "n_layer": self.n_layer,
            "vocab_size": self.vocab_size, "block_size": self.seq,
        }


@dataclass(frozen=True, slots=True)
class RankReport:
    """What one rank measured, per variant: first-step loss and gradient error, wall and CPU
    seconds per step, collectives per step, and (rank 0, with --profile) a profiler table."""

    losses: dict[str, float]
    grad_errors: dict[str, float]
    step_seconds: dict[str, list[float]]
    cpu_seconds: dict[str, list[float]]  # process CPU time of the step, without the final barrier
    collectives: dict[str, dict[str, int]]
    profiles: dict[str, str]


# ---------------------------------------------------------------------------------------------
# The hand plan: PyTorch's tensor-parallel API, as torchtitan's per-model parallelize.py does it


def _tp_attention_forward(self: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """``CausalSelfAttention.forward`` written TP-aware, as torchtitan writes its models.

    With ColwiseParallel(use_local_output=True) q/k/v hold ``n_head / tp`` heads per rank, so
    ``self.n_head`` is the local head count and the merge view infers its width (``-1``)
    instead of taking the full ``C`` from the replicated input.
    """
    B, T, _ = x.size()  # (B, T, n_embd)
    q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
    # q, k, v: (B, n_head / tp, T, head_dim)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
    y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, n_embd / tp)
    return self.resid_drop(self.c_proj(y))


def dtensor_megatron(model: nn.Module, mesh: DeviceMesh, *, shared_input: bool) -> nn.Module:
    """Megatron's layout by hand: column q/k/v/c_fc, row attn.c_proj/mlp.c_proj, rest replicated.

    ``shared_input=False`` is the simplest plan: each of q/k/v wraps its own input as a DTensor,
    so backward all-reduces three input gradients per attention. ``shared_input=True`` adds
    torchtitan's ``PrepareModuleInput`` on the attention module: x becomes one DTensor that
    q/k/v share, their Partial gradients add up, and one all-reduce per attention remains,
    the same collectives as Megatron-LM and as autotp.
    """
    tp_size = mesh.size()
    plan: dict[str, ParallelStyle] = {}
    for i, block in enumerate(model.blocks):
        if block.attn.n_head % tp_size != 0:
            raise ValueError(f"n_head ({block.attn.n_head}) must be divisible by the {tp_size} ranks for the DTensor plan")
        if shared_input:
            plan[f"blocks.{i}.attn"] = PrepareModuleInput(
                input_layouts=(dtensor.Replicate(),), desired_input_layouts=(dtensor.Replicate(),)
            )
        for suffix in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.c_fc"):
            plan[f"blocks.{i}.{suffix}"] = ColwiseParallel()
        for suffix in ("attn.c_proj", "mlp.c_proj"):
            plan[f"blocks.{i}.{suffix}"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    for block in model.blocks:
        block.attn.n_head //= tp_size
        block.attn.forward = types.MethodType(_tp_attention_forward, block.attn)
    return model


# ---------------------------------------------------------------------------------------------
# autotp, pinned to the same layout


def planning_space(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, tp_size: int, hardware: str) -> tuple[StrategySpace, CostModel]:
    """What ``autotp.plan`` builds before solving, priced for training with AdamW (its default)."""
    space = build_strategy_space(capture(model, inputs), tp_size)
    return space, CostModel(resolve_hardware(hardware), tp_size, training=True, optimizer=OPTIMIZER)


def megatron_plan(space: StrategySpace, cost: CostModel) -> Plan:
    """autotp's ILP pinned to exactly the hand plan's layout.

    Block linears are pinned to Megatron's column/row strategies (``megatron_pins``); every op
    outside the attention and MLP modules (embeddings, residual adds, layer norms, lm_head) is
    pinned to all-replicate, as the DTensor plan leaves them. The solver only fills in what
    follows: the ops between a column and a row linear, and the parameters' placements.
    """
    pins = megatron_pins(space)
    for node in space.nodes:
        if node.kind is NodeKind.OP and node.name not in pins and not _TP_MODULE.match(node.module_path):
            pins[node.name] = next(s for s in node.strategies if not _splits(s))
    return solve_plan(space, cost, hardware=cost.profile.name, memory_budget=None, pinned=pins)


# Module paths whose interior the hand plan shards: everything between a column and a row linear.
_TP_MODULE = re.compile(r"blocks\.\d+\.(attn|mlp)(\.|$)")


def _splits(strategy: MeshStrategy) -> bool:
    return any(not isinstance(p, Replicate) for placements in (*strategy.inputs, *strategy.outputs) for p in placements)


# ---------------------------------------------------------------------------------------------
# The rank function


def train_step(module: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    module.zero_grad(set_to_none=True)
    logits = module(idx)  # (B, T, vocab_size), replicated on every rank in every variant
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    return loss.detach()


def _grad_error(reference: nn.Module, module: nn.Module, rank: int, tp_size: int) -> float:
    """Largest |grad - reference grad| over all parameters after one step, on this rank's part.

    DTensor gradients are gathered; an autotp shard is compared with the matching chunk of the
    reference gradient (the split dim is the one whose size differs).
    """
    worst = 0.0
    for name, param in module.named_parameters():
        expected = reference.get_parameter(name).grad
        grad = param.grad
        if isinstance(grad, dtensor.DTensor):
            grad = grad.full_tensor()
        if grad.shape != expected.shape:
            (dim,) = [d for d, (a, b) in enumerate(zip(grad.shape, expected.shape)) if a != b]
            expected = expected.chunk(tp_size, dim=dim)[rank]
        worst = max(worst, (grad - expected).abs().max().item())
    return worst


def _count_collectives(step: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Collectives one step issues (forward and backward), by op, as the dispatcher sees them."""
    with CommDebugMode() as comm, warnings.catch_warnings():
        # CommDebugMode's module tracker hooks every module's backward; the inputs here are
        # token ids, which need no gradient, and torch warns about that once per module tree.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        step()
    return {str(op).rsplit(".", 1)[-1]: n for op, n in comm.get_comm_counts().items()}


def _profile_step(step: Callable[[], torch.Tensor], *, row_limit: int = 25) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def build_variants(config: BenchConfig, mesh: DeviceMesh) -> tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor]:
    """Every variant of the same GPT (same weights), plus the input ids and next-token targets."""
    tp_size = mesh.size()
    model, (idx,) = build_example("gpt", batch=config.batch, seq=config.seq, **config.model_kwargs())
    targets = torch.roll(idx, shifts=-1, dims=1)  # (B, T)
    space, cost = planning_space(model, (idx,), tp_size=tp_size, hardware=config.hardware)
    plan = megatron_plan(space, cost)
    # The training state (weights, gradients, AdamW moments) with every parameter split, i.e.
    # about 1/tp of the whole model's, with some headroom.
    budget = int(config.budget_factor * min_state_nbytes(space, cost))
    variants = {
        "reference": model,
        "autotp megatron": autotp.parallelize(model, mesh, (idx,), hardware=config.hardware, plan=plan),
        "autotp planned": autotp.parallelize(
            model, mesh, (idx,), hardware=config.hardware, memory_budget=budget, optimizer=OPTIMIZER
        ),
        "dtensor": dtensor_megatron(copy.deepcopy(model), mesh, shared_input=False),
        "dtensor torchtitan": dtensor_megatron(copy.deepcopy(model), mesh, shared_input=True),
    }
    return variants, idx, targets


def _all_reduce_step(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        dist.all_reduce(x)
        return x
    return step


def run_rank(rank: int, world_size: int, config: BenchConfig) -> RankReport:
    mesh = init_device_mesh("cpu", (world_size,))
    variants, idx, targets = build_variants(config, mesh)
    reference = variants["reference"]
    steps = {name: (lambda m=module: train_step(m, idx, targets)) for name, module in variants.items()}
    losses = {name: step().item() for name, step in steps.items()}
    grad_errors = {name: _grad_error(reference, module, rank, world_size) for name, module in variants.items()}
    collectives = {name: _count_collectives(step) for name, step in steps.items()}
    # One bare all-reduce of an activation, (B, T, n_embd): the unit every TP variant pays.
    steps[ALL_REDUCE] = _all_reduce_step(torch.ones(config.batch, config.seq, config.n_embd))

    seconds: dict[str, list[float]] = {name: [] for name in steps}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(config.warmup + config.steps):
        for name, step in steps.items():  # round-robin: drift and noise hit every variant alike
            dist.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
            step()
            cpu = time.process_time() - cpu_started  # this rank's work (all its threads), not waits
            dist.barrier()
            if i >= config.warmup:
                seconds[name].append(time.perf_counter() - started)
                cpu_seconds[name].append(cpu)

    profiles: dict[str, str] = {}
    for name, step in steps.items():
        if config.profile and name != ALL_REDUCE:
            if rank == 0:
                profiles[name] = _profile_step(step)
            else:  # peers issue the same collectives, unprofiled
                step()
    return RankReport(losses, grad_errors, seconds, cpu_seconds, collectives, profiles)


# ---------------------------------------------------------------------------------------------
# Reporting


def _median_ms(reports: Sequence[RankReport], name: str) -> float:
    """Median over steps of the slowest rank's time, in milliseconds."""
    per_step = zip(*(r.step_seconds[name] for r in reports))
    return statistics.median(max(step) for step in per_step) * 1e3


def _cpu_ms(reports: Sequence[RankReport], name: str) -> float:
    """Median over steps of the CPU time one rank spends on a step, averaged over ranks, in ms."""
    return statistics.fmean(statistics.median(r.cpu_seconds[name]) for r in reports) * 1e3


def _format_collectives(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "none"


def report(config: BenchConfig, reports: Sequence[RankReport]) -> str:
    """The table, the headline ratio lines, and the profiles if any."""
    first = reports[0]
    medians = {name: _median_ms(reports, name) for name in (*VARIANTS, ALL_REDUCE)}
    grad_errors = {name: max(r.grad_errors[name] for r in reports) for name in VARIANTS}
    setting = (
        f"GPT n_embd={config.n_embd} n_head={config.n_head} n_layer={config.n_layer} "
        f"vocab={config.vocab_size} batch={config.batch} seq={config.seq}, fp32, on {config.nproc} gloo "
        f"CPU ranks with 1 thread each; median of {config.steps} fwd+bwd steps (slowest rank) after "
        f"{config.warmup} warm-up, variants stepped round-robin"
    )
    header = (
        f"{'variant':<19} {'median ms':>9} {'vs dtensor':>10} {'cpu ms/rank':>11} {'first loss':>10} "
        f"{'max grad err':>12}  "
        "collectives per step (fwd+bwd)"
    )
    lines = [setting, "", header]
    for name in VARIANTS:
        lines.append(
            f"{name:<19} {medians[name]:>9.2f} {medians[name] / medians[BASELINE]:>9.2f}x "
            f"{_cpu_ms(reports, name):>11.2f} {first.losses[name]:>10.6f} {grad_errors[name]:>12.1e}  {_format_collectives(first.collectives[name])}"
        )
    shape = f"({config.batch}, {config.seq}, {config.n_embd})"
    lines.append(
        f"{'(one all_reduce)':<19} {medians[ALL_REDUCE]:>9.2f} {'':>10} {_cpu_ms(reports, ALL_REDUCE):>11.2f}  "
        f"of a {shape} fp32 activation (+ barrier), for scale"
    )
    ratio = medians["autotp megatron"] / medians[BASELINE]
    titan = medians["autotp megatron"] / medians["dtensor torchtitan"]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    lines += [
        "",
        f"autotp (Megatron layout) / DTensor = {ratio:.2f} (target <= {TARGET_RATIO:.2f}): {verdict}",
        (
            "autotp (Megatron layout) / DTensor with torchtitan's shared attention input "
            f"(same collectives) = {titan:.2f}"
        ),
    ]
    for name, table in first.profiles.items():
        lines += ["", f"--- rank 0 profile of one step: {name} ---", table]
    return "\n".join(lines)


def check_correct(reports: Sequence[RankReport]) -> list[str]:
    """Each TP variant whose first-step loss or gradients differ from the reference's, and how."""
    problems = []
    for rank, r in enumerate(reports):
        for name in VARIANTS[1:]:
            diff = abs(r.losses[name] - r.losses["reference"])
            if diff > LOSS_ATOL or r.grad_errors[name] > GRAD_ATOL:
                problems.append(
                    f"rank {rank}: '{name}' does not compute what the reference does: first-step "
                    f"loss {r.losses[name]:.6f} vs {r.losses['reference']:.6f} (|diff| {diff:.1e}, "
                    f"tolerance {LOSS_ATOL:g}), largest gradient difference {r.grad_errors[name]:.1e} "
                    f"(tolerance {GRAD_ATOL:g}); its time is not comparable"
                )
    return problems


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4, help="gloo CPU ranks (tp size)")
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=512, help="divisible by --nproc")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--budget-factor", type=float, default=1.15,
                        help="autotp planned: memory budget = factor * training state (weights, grads, "
                        "AdamW moments) / nproc")
    parser.add_argument("--hardware", default="cpu-gloo", help="autotp hardware profile")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per variant (rank 0)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are killed")
    args = parser.parse_args(argv)
    if args.vocab_size % args.nproc or args.n_head % args.nproc:
        parser.error(f"--vocab-size ({args.vocab_size}) and --n-head ({args.n_head}) must be divisible by --nproc ({args.nproc})")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return BenchConfig(
        nproc=args.nproc, n_embd=args.n_embd, n_head=args.n_head, n_layer=args.n_layer,
        vocab_size=args.vocab_size, batch=args.batch, seq=args.seq, steps=args.steps,
        warmup=args.warmup, budget_factor=args.budget_factor, hardware=args.hardware,
        profile=args.profile, timeout_seconds=args.timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    started = time.perf_counter()
    reports = run_on_ranks(run_rank, config.nproc, config, timeout_seconds=config.timeout_seconds)
    print(report(config, reports))
    print(f"\n(wall time {time.perf_counter() - started:.1f} s)")
    problems = check_correct(reports)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
