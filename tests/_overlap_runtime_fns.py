"""Rank functions and models for ``tests/test_overlap_runtime.py``: module-level, so spawned
ranks can import them."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.capture.export import capture
from autotp.comm import collectives
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.ir.placement import P, R, local_chunk
from autotp.ir.plan import Plan
from autotp.solve.memory import min_state_nbytes, state_nbytes
from autotp.solve.planner import megatron_plan, solve_plan
from autotp.strategies.engine import NodeKind, StrategySpace, build_strategy_space

HARDWARE = "cpu-gloo"


# --- async collectives ----------------------------------------------------------------------------
def _cases() -> list[tuple[str, Any, tuple[Any, ...]]]:
    """(name, collective, its arguments after x and before the group)."""
    return [
        ("all_reduce", collectives.all_reduce, ()),
        *((f"all_gather dim {d}", collectives.all_gather, (d,)) for d in (0, 1, -1)),
        *((f"reduce_scatter dim {d}", collectives.reduce_scatter, (d,)) for d in (0, 1, -1)),
    ]


def async_matches_blocking(rank: int, world_size: int) -> list[tuple[str, float, float, float]]:
    """Per collective: the largest difference of output and of input gradient, started + waited
    against blocking (a gradient that differs per rank and element), and of the output in
    inference (no autograd Function)."""
    group = dist.group.WORLD.group_name  # type: ignore[union-attr]
    torch.manual_seed(rank)
    x = torch.randn(2 * world_size, 3 * world_size, world_size * 2)  # every dim divides world_size
    results = []
    for name, call, args in _cases():
        outs, grads = [], []
        for async_op in (False, True):
            leaf = x.clone().requires_grad_()
            y = call(leaf, *args, group, async_op=async_op)
            if async_op:
                y = collectives.wait(y)
            weight = torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape) * (rank + 1)
            (y * weight).sum().backward()
            outs.append(y.detach())
            grads.append(leaf.grad)
        with torch.no_grad():  # inference: the plain start, no autograd Function
            started = call(x, *args, group, async_op=True)
            plain = collectives.wait(started) - outs[0]
        results.append((name, (outs[0] - outs[1]).abs().max().item(), (grads[0] - grads[1]).abs().max().item(), plain.abs().max().item()))
    return results


# --- fused linears --------------------------------------------------------------------------------
def _readers(rank: int) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor, torch.Tensor | None, float, float]]]:
    """An input and one reader of each kind (``collectives.ContractionReader``), each rank its own
    column chunk; the addmm with scalars other than 1."""
    torch.manual_seed(100 + rank)
    x = torch.randn(10, 8)
    return x, [
        ("linear", torch.randn(6, 8), torch.randn(6), 1.0, 1.0),
        ("linear", torch.randn(4, 8), None, 1.0, 1.0),
        ("addmm", torch.randn(8, 3), torch.randn(3), 0.5, 2.0),
        ("mm", torch.randn(8, 5), None, 1.0, 1.0),
    ]


def _plain(x: torch.Tensor, reader: tuple[str, torch.Tensor, torch.Tensor | None, float, float]) -> torch.Tensor:
    kind, w, b, beta, alpha = reader
    if kind == "linear":
        return F.linear(x, w, b)
    return torch.addmm(b, x, w, beta=beta, alpha=alpha) if kind == "addmm" else torch.mm(x, w)  # type: ignore[arg-type]


def fused_linears_match_marker_path(rank: int, world_size: int) -> dict[str, Any]:
    """Outputs and gradients of ``linears_with_grad_sync`` against ``grad_all_reduce`` + plain
    linears, and the order of the backward's start, weight gradients and wait."""
    group = dist.group.WORLD.group_name  # type: ignore[union-attr]
    torch.manual_seed(0)
    x0 = torch.randn(10, 8)  # the replicated input: the same on every rank
    _, params = _readers(rank)
    runs = []
    for fused in (False, True):
        x = x0.clone().requires_grad_()
        leaves = [(kind, w.clone().requires_grad_(), None if b is None else b.clone().requires_grad_(), beta, alpha) for kind, w, b, beta, alpha in params]
        if fused:
            outs = collectives.linears_with_grad_sync(x, tuple(leaves), group)
        else:
            synced = collectives.grad_all_reduce(x, group)
            outs = tuple(_plain(synced, reader) for reader in leaves)
        loss = sum(((o * (i + 1 + rank)) ** 2).sum() for i, o in enumerate(outs))
        loss.backward()
        runs.append({
            "outs": [o.detach() for o in outs],
            "grads": [x.grad, *(t.grad for _, w, b, _, _ in leaves for t in (w, b) if t is not None)],
        })
    with torch.no_grad():
        inference = collectives.linears_with_grad_sync(x0, tuple(params), group)
    return {
        "out_error": max((a - b).abs().max().item() for a, b in zip(runs[0]["outs"], runs[1]["outs"])),
        "grad_error": max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(runs[0]["grads"], runs[1]["grads"])),  # relative: fp32 sums in another order
        "grad_count": len(runs[1]["grads"]),
        "inference_error": max((a - b).abs().max().item() for a, b in zip(inference, runs[0]["outs"])),
        "order": backward_order(rank, world_size),
    }


def backward_order(rank: int, world_size: int) -> list[str]:
    """The events of one fused backward, in order: the gradient sync's start and wait, and each
    weight gradient (spied on: ``collectives`` looks these names up at call time)."""
    group = dist.group.WORLD.group_name  # type: ignore[union-attr]
    events: list[str] = []
    start, wait, weight_grads = collectives._start_all_reduce, collectives.wait, collectives._weight_grads

    def spy_start(x: torch.Tensor, group_name: str) -> torch.Tensor:
        events.append("start")
        return start(x, group_name)

    def spy_wait(x: torch.Tensor) -> torch.Tensor:
        events.append("wait")
        return wait(x)

    def spy_weight_grads(*args: Any, **kwargs: Any) -> Any:
        events.append("weight grad")
        return weight_grads(*args, **kwargs)

    x, params = _readers(rank)
    x.requires_grad_()
    leaves = tuple((kind, w.requires_grad_(), b, beta, alpha) for kind, w, b, beta, alpha in params)
    outs = collectives.linears_with_grad_sync(x, leaves, group)
    loss = sum(o.sum() for o in outs)
    collectives._start_all_reduce, collectives.wait, collectives._weight_grads = spy_start, spy_wait, spy_weight_grads  # type: ignore[assignment]
    try:
        loss.backward()
    finally:
        collectives._start_all_reduce, collectives.wait, collectives._weight_grads = start, wait, weight_grads  # type: ignore[assignment]
    return events


# --- the acceptance model: independent compute between a collective and its reader ---------------
class Fork(nn.Module):
    """``row(x)`` (row parallel: a partial sum to all-reduce) and ``other(x)`` (independent of it), added."""

    def __init__(self) -> None:
        super().__init__()
        self.row = nn.Linear(16, 16)
        self.other = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.row(x)  # (B, T, 16)
        b = self.other(x)
        return a + b


def fork_plan(tp_size: int) -> tuple[Any, StrategySpace, Plan]:
    """``row`` pinned to a strategy whose output is a partial sum, everything else replicated."""
    model, x = Fork(), torch.randn(2, 4, 16)
    captured = capture(model, (x,))
    space = build_strategy_space(captured, tp_size)
    pins = {}
    for node in space.nodes:
        if node.kind is not NodeKind.OP:
            continue
        if node.module_path == "row" and node.op == "aten.linear.default":
            pins[node.name] = next(s for s in node.strategies if s.outputs[0] == (P,))
        else:
            pins[node.name] = next(s for s in node.strategies if s.replicated)
    cost = CostModel(resolve_hardware(HARDWARE), tp_size, training=True, optimizer="adamw")
    return captured, space, solve_plan(space, cost, hardware=HARDWARE, memory_budget=None, pinned=pins)


def squeezed_plan(example: str, *, training: bool, tp_size: int = 2) -> tuple[Any, StrategySpace, Plan]:
    """A plan of ``example`` on a meta device under a budget 0.3 of the way from the smallest
    state to all-replicated, which forces splits (as ``tests/test_conversion_sites.py``)."""
    model, inputs = build_example(example, device="meta", batch=2, seq=16)
    captured = capture(model, inputs)
    space = build_strategy_space(captured, tp_size)
    cost = CostModel(resolve_hardware("h100-sxm"), tp_size, training=training, optimizer="adamw" if training else None)
    floor = min_state_nbytes(space, cost)
    replicated = sum(state_nbytes(n, (R,), cost) for n in space.nodes if n.kind is NodeKind.STATE)
    budget = int(floor + 0.3 * (replicated - floor)) + 1
    return captured, space, solve_plan(space, cost, hardware="h100-sxm", memory_budget=budget)


# --- equality of the examples with overlap on ------------------------------------------------------
def _loss(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    targets = torch.roll(inputs[0], -1, dims=1)
    return F.cross_entropy(out.flatten(0, 1), targets.flatten())


def _graph_counts(gm: fx.GraphModule) -> dict[str, int]:
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return {
        "async_starts": sum(n.kwargs.get("async_op", False) for n in calls),
        "waits": sum(n.target is collectives.wait for n in calls),
        "fused": sum(n.target is collectives.linears_with_grad_sync for n in calls),
        "markers": sum(n.target is collectives.grad_all_reduce for n in calls),
    }


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # a Hugging Face model's output holds them


def _build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if name.startswith("hf:"):
        from tests._hf_fns import build_hf_model

        return build_hf_model(name.removeprefix("hf:"))
    return build_example(name)


def examples_match_unsharded(rank: int, world_size: int, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per example (``autotp.examples``, or a ``tests/_hf_fns`` model such as ``hf:gpt2``) and
    ``overlap``: output, gradient and one-AdamW-step parameter errors of a Megatron-planned
    sharded model against the unsharded one, and its graph's node counts (the fused nodes' reader
    kinds too)."""
    mesh = init_device_mesh("cpu", (world_size,))
    report: dict[str, dict[str, Any]] = {}
    for name in names:
        model, inputs = _build(name)
        shared: list[Plan | None] = [None]
        if rank == 0:  # the solver may break ties differently per process: one plan, from rank 0
            space = build_strategy_space(capture(model, inputs), world_size)
            shared[0], _ = megatron_plan(space, CostModel(resolve_hardware(HARDWARE), world_size, training=True, optimizer="adamw"), hardware=HARDWARE)
        dist.broadcast_object_list(shared, src=0)
        plan = shared[0]
        assert plan is not None
        reference_out = _logits(model(*inputs))
        _loss(reference_out, inputs).backward()
        reference_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
        reference_grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        reference_opt.step()
        stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
        for overlap in (True, False):
            fresh, _ = _build(name)  # the same seed: the weights before the step
            sharded = autotp.parallelize(fresh, mesh, inputs, plan=plan, overlap=overlap)
            placements = sharded.placements()
            out = _logits(sharded(*inputs))
            _loss(out, inputs).backward()
            grad_error = max(  # absolute: GPT's key bias has an exactly-zero true gradient (rounding noise only)
                (p.grad - local_chunk(reference_grads[n], placements[n], (world_size,), (rank,))).abs().max().item()
                for n, p in sharded.named_parameters()
            )
            torch.optim.AdamW(sharded.parameters(), lr=1e-2, eps=1e-6).step()
            full = autotp.full_state_dict(sharded)
            report[f"{name} overlap={overlap}"] = {
                "out_error": ((out - reference_out).abs().max() / reference_out.abs().max()).item(),
                "grad_error": grad_error,
                "param_error": max((full[n] - t).abs().max().item() for n, t in stepped.items()),
                **_graph_counts(sharded.graph_module),
                "fused_kinds": sorted({r[0] for n in sharded.graph_module.graph.nodes if n.target is collectives.linears_with_grad_sync for r in n.args[1]}),
            }
    return report


def autocast_overlap_matches_blocking(rank: int, world_size: int) -> dict[str, Any]:
    """GPT's Megatron plan run under bfloat16 autocast with overlap on and off: the largest
    difference of logits and of each gradient (relative to its size), the gradients' dtypes, and
    the fused nodes of the overlapping graph."""
    mesh = init_device_mesh("cpu", (world_size,))
    model, (idx,) = build_example("gpt")
    shared: list[Plan | None] = [None]
    if rank == 0:
        space = build_strategy_space(capture(model, (idx,)), world_size)
        shared[0], _ = megatron_plan(space, CostModel(resolve_hardware(HARDWARE), world_size, training=True, optimizer="adamw"), hardware=HARDWARE)
    dist.broadcast_object_list(shared, src=0)
    runs = {}
    for overlap in (False, True):
        sharded = autotp.parallelize(model, mesh, (idx,), plan=shared[0], overlap=overlap)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = sharded(idx)  # (B, T, vocab) in bfloat16
        logits.float().sum().backward()
        runs[overlap] = (logits.detach().float(), {n: p.grad for n, p in sharded.named_parameters()}, _graph_counts(sharded.graph_module)["fused"])
    (blocking, blocking_grads, _), (overlapped, grads, fused) = runs[False], runs[True]
    return {
        "logit_error": (blocking - overlapped).abs().max().item(),
        "grad_error": max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in blocking_grads.items()),
        "grad_dtypes": sorted({str(g.dtype) for g in grads.values()}),
        "fused": fused,
    }
