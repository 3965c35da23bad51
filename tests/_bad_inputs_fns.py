"""Rank functions for tests/test_bad_inputs.py: module-level, so spawned ranks can import them.

``run_cases`` runs every multi-rank case of the matrix in one spawn and returns, per case, either
``("ok", detail)`` (what the test compares with the unsharded model) or ``(error type, message)``:
one spawn instead of one per case keeps the module fast, and each case catches its own error so a
failing case cannot take the others down with it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

import autotp
from tests._state_fns import StraightThrough

WIDTH = 24  # 3 ranks divide it (and 4 * WIDTH): weights can be split evenly
UNEVEN = 16  # 3 ranks divide neither 16 nor 64: tensors are split unevenly or stay whole
STATE_FACTOR = 4  # fp32 weights + gradients + two AdamW moments, per parameter byte

Outcome = tuple[str, Any]


class MLP(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class BatchNormMLP(nn.Module):
    """Its BatchNorm1d updates running statistics (buffers) in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.norm = nn.BatchNorm1d(4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(x))))


class TiedLM(nn.Module):
    """GPT-2's tie: the output head is the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(48, WIDTH)
        self.mid = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 48, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(ids))))


class InPlace(nn.Module):
    """In-place ops on activations (not on state): the value written stays replicated."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h.add_(1)
        h.masked_fill_(h > 0.5, 0.0)
        h.relu_()  # last: relu's backward reads its output, which a later in-place op would change
        return self.down(h)


class EmbeddingOptions(nn.Module):
    """An embedding whose options change its training: ``max_norm`` renormalises the looked-up rows
    of the weight in place; ``scale_grad_by_freq`` divides each row's gradient by its id's count."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(48, WIDTH, **options)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, 48)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids))))


class Quantised(MLP):
    """A custom autograd Function between the layers: its own backward, not round's zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(StraightThrough.apply(torch.relu(self.up(x)), 4.0))


class Cached(MLP):
    """Writes its hidden state into a slice of a registered buffer, as a key/value cache does."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(4, 6 * WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        self.cache[:, WIDTH:5 * WIDTH] = h.detach()
        return self.down(h) + self.cache[:, :2 * WIDTH].sum()


class MixedInputs(nn.Module):
    """Float, integer and bool inputs at once."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(48, WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.up(x + self.embed(ids)).masked_fill(mask.unsqueeze(-1), 0.0)
        return self.down(h)


def _inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _budget(model: nn.Module, ranks: int, factor: float = 1.25) -> int:
    """About a rank's share of the training state: too little to replicate, so weights are split."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(nbytes * STATE_FACTOR / ranks * factor)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach() - b.detach()).abs().max().item()


def _split_count(sharded: autotp.ShardedModule) -> int:
    return sum(any(isinstance(p, autotp.Shard) for p in per_axis) for per_axis in sharded.placements().values())


def _sgd_step(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One SGD step on the mean square of the output; the output before the step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(*inputs)
    out.float().pow(2).mean().backward()
    opt.step()
    return out


def _train_step_agrees(
    build: Callable[[], nn.Module], inputs: tuple[torch.Tensor, ...], mesh: DeviceMesh, *, budget: bool = True, budget_factor: float = 1.25,
) -> dict[str, Any]:
    """The largest output and state difference after one SGD step, sharded against unsharded;
    ``budget`` gives a rank about its share of the state, so weights must be split."""
    torch.manual_seed(0)
    reference = build()
    torch.manual_seed(0)
    model = build()
    sharded = autotp.parallelize(model, mesh, inputs, memory_budget=_budget(model, mesh.size(), budget_factor) if budget else None)
    out_diff = _diff(_sgd_step(sharded, inputs), _sgd_step(reference, inputs))
    full = autotp.full_state_dict(sharded)
    expected = reference.state_dict()
    return {
        "out_diff": out_diff,
        "state_diff": max(_diff(full[k].float(), v.float()) for k, v in expected.items()),
        "same_keys": sorted(full) == sorted(expected),
        "split": _split_count(sharded),
    }


# ------------------------------------------------------------------------------------------
# correct results


def mesh_of_one(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """A 1-rank mesh (the 'tp' axis of a (world, 1) mesh): nothing to split, the same numbers."""
    mesh = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("dp", "tp"))["tp"]
    return _train_step_agrees(MLP, (_inputs(4, WIDTH),), mesh)


def uneven_widths(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """Widths of 16 and 64 on 3 ranks: splits are uneven or tensors stay whole, and still correct."""
    return _train_step_agrees(lambda: MLP(UNEVEN), (_inputs(4, UNEVEN),), init_device_mesh("cpu", (world_size,)), budget=False)


def batchnorm_train(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """BatchNorm1d in train mode: the output, the weights and the running statistics after a step."""
    return _train_step_agrees(BatchNormMLP, (_inputs(8, WIDTH),), init_device_mesh("cpu", (world_size,)))


def tied_weights(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    ids = torch.randint(0, 48, (2, 6), generator=torch.Generator().manual_seed(2))
    return _train_step_agrees(TiedLM, (ids,), init_device_mesh("cpu", (world_size,)))


def inplace_activations(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    return _train_step_agrees(InPlace, (_inputs(4, WIDTH),), init_device_mesh("cpu", (world_size,)))


def _ids() -> torch.Tensor:
    return torch.randint(0, 48, (4, 6), generator=torch.Generator().manual_seed(4))


def embedding_max_norm(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """The renormalised weight stays whole (it is written in place), so it needs more room."""
    return _train_step_agrees(lambda: EmbeddingOptions(max_norm=1.0), (_ids(),), init_device_mesh("cpu", (world_size,)), budget_factor=2.0)


def embedding_scale_grad_by_freq(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    return _train_step_agrees(lambda: EmbeddingOptions(scale_grad_by_freq=True), (_ids(),), init_device_mesh("cpu", (world_size,)))


def custom_autograd_function(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    return _train_step_agrees(Quantised, (_inputs(4, WIDTH),), init_device_mesh("cpu", (world_size,)))


def buffer_written_in_place(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    return _train_step_agrees(Cached, (_inputs(4, WIDTH),), init_device_mesh("cpu", (world_size,)))


def mixed_inputs(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """Integer ids, a bool mask and a non-contiguous float input (a transposed view)."""
    x = _inputs(WIDTH, 4).t()  # (4, WIDTH), not contiguous
    ids = torch.randint(0, 48, (4,), generator=torch.Generator().manual_seed(3))
    mask = torch.arange(4) % 2 == 0
    assert not x.is_contiguous()
    return _train_step_agrees(MixedInputs, (x, ids, mask), init_device_mesh("cpu", (world_size,)))


def meta_init_in_parts(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """A meta model initialised part by part by ``init_fn`` computes what the same model
    initialised whole computes."""
    def value(name: str, shape: torch.Size) -> torch.Tensor:  # a deterministic tensor per name
        return 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(len(name) * 7 + shape.numel()))

    with torch.device("meta"):
        meta = MLP()
    reference = MLP()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(value(name, p.shape))
    x = _inputs(4, WIDTH)
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = autotp.parallelize(
        meta, mesh, (x,), memory_budget=_budget(reference, world_size) // STATE_FACTOR, training=False,  # no gradients or moments
        init_fn=lambda name, local, shape, shard: local.copy_(value(name, shape)[shard.index]),
    )
    with torch.no_grad():
        return {"out_diff": _diff(sharded(x), reference(x)), "split": _split_count(sharded)}


def dcp_directory_round_trip(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """``load_sharded_state_dict(sharded, directory)`` loads what ``dcp.save`` wrote, into another plan."""
    mesh = init_device_mesh("cpu", (world_size,))
    x = _inputs(4, WIDTH)
    torch.manual_seed(0)
    saved = MLP()
    sharded = autotp.parallelize(saved, mesh, (x,), memory_budget=_budget(saved, world_size))
    path = os.path.join(tmp, "round_trip")
    dcp.save(autotp.sharded_state_dict(sharded), checkpoint_id=path)
    torch.manual_seed(5)
    other = autotp.parallelize(MLP(), mesh, (x,))  # other weights, no budget: another plan
    autotp.load_sharded_state_dict(other, path)
    with torch.no_grad():
        return {"out_diff": _diff(other(x), saved(x))}


def compiled(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """``torch.compile`` (aot_eager: no C compiler needed) of a sharded module, forward and backward."""
    mesh = init_device_mesh("cpu", (world_size,))
    x = _inputs(4, WIDTH)
    torch.manual_seed(0)
    model = MLP()
    sharded = autotp.parallelize(model, mesh, (x,), memory_budget=_budget(model, world_size))
    out = torch.compile(sharded, backend="aot_eager")(x)
    out.pow(2).mean().backward()
    model(x).pow(2).mean().backward()
    full_grads = {n: p.grad for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in sharded.named_parameters()}
    return {"out_diff": _diff(out, model(x)), "has_grads": all(g is not None for g in grads.values()), "grad_names": sorted(grads) == sorted(full_grads)}


# ------------------------------------------------------------------------------------------
# typed errors


def plan_for_another_world(rank: int, world_size: int, tmp: str) -> None:
    with torch.device("meta"):
        meta = MLP()
    x = _inputs(4, WIDTH)
    plan = autotp.plan(meta, (x.to("meta"),), mesh_shape=world_size + 1, hardware="cpu-gloo")
    autotp.parallelize(MLP(), init_device_mesh("cpu", (world_size,)), (x,), plan=plan)


def plan_for_another_model(rank: int, world_size: int, tmp: str) -> None:
    x = _inputs(4, WIDTH)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
    plan = autotp.plan(meta, (x.to("meta"),), mesh_shape=world_size, hardware="cpu-gloo")
    autotp.parallelize(MLP(), init_device_mesh("cpu", (world_size,)), (x,), plan=plan)


def rank1_other_shape(rank: int, world_size: int, tmp: str) -> None:
    """Rank 1 builds a wider model than the others: every rank raises, none waits."""
    width = 2 * WIDTH if rank == 1 else WIDTH
    autotp.parallelize(MLP(width), init_device_mesh("cpu", (world_size,)), (_inputs(4, width),), setup_timeout_s=60)


def rank1_bad_weights(rank: int, world_size: int, tmp: str) -> None:
    """Rank 1 alone is given a checkpoint path that does not exist."""
    weights = os.path.join(tmp, "no-such-checkpoint") if rank == 1 else None
    autotp.parallelize(MLP(), init_device_mesh("cpu", (world_size,)), (_inputs(4, WIDTH),), weights=weights, setup_timeout_s=60)


def _saved_without(tmp: str, name: str, dropped: str) -> tuple[autotp.ShardedModule, str, dict[str, Any]]:
    """A sharded MLP, and a DCP checkpoint of it that lacks the tensor ``dropped``."""
    mesh = init_device_mesh("cpu", (world_size := dist.get_world_size(),))
    torch.manual_seed(0)
    model = MLP()
    sharded = autotp.parallelize(model, mesh, (_inputs(4, WIDTH),), memory_budget=_budget(model, world_size))
    partial = {k: v for k, v in autotp.sharded_state_dict(sharded).items() if k != dropped}
    path = os.path.join(tmp, name)
    dcp.save(partial, checkpoint_id=path)
    return sharded, path, partial


def dcp_directory_lacks_tensor(rank: int, world_size: int, tmp: str) -> None:
    sharded, path, _ = _saved_without(tmp, "lacks_dir", "down.bias")
    autotp.load_sharded_state_dict(sharded, path)


def state_dict_lacks_tensor(rank: int, world_size: int, tmp: str) -> None:
    sharded, _, partial = _saved_without(tmp, "lacks_dict", "up.weight")
    autotp.load_sharded_state_dict(sharded, partial)


def not_a_dcp_directory(rank: int, world_size: int, tmp: str) -> None:
    torch.manual_seed(0)
    sharded = autotp.parallelize(MLP(), init_device_mesh("cpu", (world_size,)), (_inputs(4, WIDTH),))
    autotp.load_sharded_state_dict(sharded, tmp)


def ranks_with_different_weights(rank: int, world_size: int, tmp: str) -> None:
    """Each rank seeds its own model: the replicated copies differ."""
    torch.manual_seed(rank)
    autotp.parallelize(MLP(), init_device_mesh("cpu", (world_size,)), (_inputs(4, WIDTH),))


def destroyed_group(rank: int, world_size: int, tmp: str) -> None:
    """A mesh whose process group was destroyed after it was built (last: it ends the group)."""
    mesh = init_device_mesh("cpu", (world_size,))
    dist.destroy_process_group()
    autotp.parallelize(MLP(), mesh, (_inputs(4, WIDTH),))


CASES: dict[str, Callable[[int, int, str], Any]] = {
    f.__name__: f for f in (
        mesh_of_one, uneven_widths, batchnorm_train, tied_weights, inplace_activations, embedding_max_norm, embedding_scale_grad_by_freq,
        custom_autograd_function, buffer_written_in_place, mixed_inputs, meta_init_in_parts, dcp_directory_round_trip, compiled,
        plan_for_another_world, plan_for_another_model, rank1_other_shape, rank1_bad_weights, ranks_with_different_weights,
        dcp_directory_lacks_tensor, state_dict_lacks_tensor, not_a_dcp_directory, destroyed_group,
    )
}


def run_cases(rank: int, world_size: int, tmp: str) -> dict[str, Outcome]:
    """Every case in order, each caught on its own: ``("ok", detail)`` or ``(error type, message)``."""
    outcomes: dict[str, Outcome] = {}
    for name, case in CASES.items():
        try:
            outcomes[name] = ("ok", case(rank, world_size, tmp))
        except Exception as exc:  # noqa: BLE001 - the test asserts on the type and message
            outcomes[name] = (type(exc).__name__, str(exc))
        if dist.is_initialized():
            dist.barrier()  # the next case starts together, whatever this one did on each rank
    return outcomes

