"""Each autograd collective and its conjugate, on 2 and 3 gloo ranks, against values derived by hand.

Convention under test (`autotp/comm/collectives.py`): the loss is computed redundantly on every rank, so
the gradient of an R tensor is R, of an S(d) tensor S(d), and of a P tensor R. Every case uses
`loss = (out * w).sum()` with the same `w` on every rank (through `all_gather` for an S output,
`all_reduce` for a P output), so d loss / d (replicated out) = w, and the input gradient is what
the collective's transpose does to w. Notation: n = world size, `base = ramp(SHAPE)`,
`block(t, dim, r)` = rank r's chunk of t along dim.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from autotp.testing import run_on_ranks
from tests import _collective_fns as fns
from tests._collective_fns import (
    ALL_TO_ALL_DIMS,
    DIMS,
    SHAPE,
    local_shape,
    loss_weight,
    ramp,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"tp{n}")
def ranks(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    """(n, per-rank results of every case): one spawn per world size, shared by the tests below."""
    world_size = request.param
    return world_size, run_on_ranks(fns.all_cases, world_size, timeout_seconds=90)


def block(t: torch.Tensor, dim: int, rank: int, n: int) -> torch.Tensor:
    """Rank `rank`'s chunk of `t` along `dim`, by explicit offsets rather than `chunk`."""
    size = t.shape[dim] // n
    return t.narrow(dim, rank * size, size)


def check(case: dict[str, torch.Tensor], **expected: torch.Tensor) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(case[key], value, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_all_reduce_sums_partials_and_passes_gradient_through(ranks: tuple[int, list]) -> None:
    n, results = ranks
    base, w = ramp(SHAPE), loss_weight(SHAPE)
    for result in results:
        # out = sum_r (base + 100 r) = n base + 100 n(n-1)/2 on every rank. The true loss depends
        # on x_r only through that sum, d out / d x_r = I, so grad x_r = w: backward is identity.
        check(result["hand"]["all_reduce"], out=n * base + 100 * n * (n - 1) / 2, grad=w)


@pytest.mark.parametrize("dim", DIMS)
def test_all_gather_concatenates_and_returns_local_gradient_chunk(ranks: tuple[int, list], dim: int) -> None:
    n, results = ranks
    w = loss_weight(SHAPE)
    # out = cat(x_0, ..., x_{n-1}) along dim with x_r = ramp(local) + 100 r; x_r occupies block r
    # of out, so d loss / d x_r = block(w, dim, r).
    gathered = torch.cat([ramp(local_shape(dim, n), 100.0 * r) for r in range(n)], dim)
    for rank, result in enumerate(results):
        check(result["hand"][f"all_gather/{dim}"], out=gathered, grad=block(w, dim, rank, n))


@pytest.mark.parametrize("dim", DIMS)
def test_reduce_scatter_sums_then_shards_and_gathers_gradient(ranks: tuple[int, list], dim: int) -> None:
    n, results = ranks
    w = loss_weight(SHAPE)
    total = n * ramp(SHAPE) + 100 * n * (n - 1) / 2  # sum_r (base + 100 r)
    for rank, result in enumerate(results):
        # out_r = block r of the sum. The loss reads all_gather(out), so the S gradient of out_r
        # is block(w, r); every x_r enters the sum with coefficient 1 at every position, so its
        # gradient is the whole of w on every rank (R): the all_gather of the blocks.
        check(
            result["hand"][f"reduce_scatter/{dim}"],
            out=block(total, dim, rank, n),
            out_grad=block(w, dim, rank, n),
            grad=w,
        )


@pytest.mark.parametrize(("src_dim", "dst_dim"), ALL_TO_ALL_DIMS)
def test_all_to_all_reshards_and_sends_gradient_back(ranks: tuple[int, list], src_dim: int, dst_dim: int) -> None:
    n, results = ranks
    base, w = ramp(SHAPE), loss_weight(SHAPE)
    for rank, result in enumerate(results):
        # x_r = block(base, src, r) of one global tensor; out_r = block(base, dst, r): the same
        # global values, resharded. It only moves elements, so its transpose moves the gradient
        # back: out_r's gradient is block(w, dst, r) and x_r's is block(w, src, r).
        check(
            result["hand"][f"all_to_all/{src_dim}->{dst_dim}"],
            out=block(base, dst_dim, rank, n),
            out_grad=block(w, dst_dim, rank, n),
            grad=block(w, src_dim, rank, n),
        )


@pytest.mark.parametrize("dim", DIMS)
def test_local_chunk_shards_and_gathers_gradient(ranks: tuple[int, list], dim: int) -> None:
    n, results = ranks
    base, w = ramp(SHAPE), loss_weight(SHAPE)
    for rank, result in enumerate(results):
        # out_r = block(base, r), gradient block(w, r); x is R and each block of x feeds exactly
        # one rank's out, so the full gradient w is the concatenation of every rank's block.
        check(
            result["hand"][f"local_chunk/{dim}"],
            out=block(base, dim, rank, n),
            out_grad=block(w, dim, rank, n),
            grad=w,
        )


def test_to_partial_keeps_value_on_rank_0_and_passes_gradient_through(ranks: tuple[int, list]) -> None:
    _, results = ranks
    base, w = ramp(SHAPE), loss_weight(SHAPE)
    for rank, result in enumerate(results):
        # out_0 = x, out_r = 0 otherwise, so the P value sum_r out_r = x. The loss reads
        # all_reduce(out) (backward identity), so out's gradient is w (P -> R), and
        # d loss / d x = w through the sum: identity, on every rank.
        check(
            result["hand"]["to_partial"],
            out=base if rank == 0 else torch.zeros_like(base),
            out_grad=w,
            grad=w,
        )


def test_grad_all_reduce_is_identity_forward_and_sums_gradients(ranks: tuple[int, list]) -> None:
    n, results = ranks
    base, w = ramp(SHAPE), loss_weight(SHAPE)
    for result in results:
        # Rank r's loss is its summand (r + 1) (out * w).sum() of the true loss, so its local
        # gradient is (r + 1) w (P); the all-reduce makes it sum_r (r + 1) w = n(n+1)/2 w (R).
        check(result["hand"]["grad_all_reduce"], out=base, grad=n * (n + 1) / 2 * w)


def test_megatron_mlp_matches_single_process_reference(ranks: tuple[int, list]) -> None:
    _, results = ranks
    for rank, result in enumerate(results):
        # Output and x's gradient are R (the full reference); W1, b1 are S(0) and W2 is S(1), so
        # each rank's gradient is its chunk of the reference gradient; b2 (after the all_reduce) is R.
        for key, (actual, expected) in result["mlp"].items():
            torch.testing.assert_close(
                actual, expected, atol=1e-5, rtol=1e-5, msg=lambda m, key=key, rank=rank: f"rank {rank} {key}: {m}"
            )


def test_without_autograd_each_op_gives_the_same_values_as_its_function(ranks: tuple[int, list]) -> None:
    """Under no_grad the ops skip their autograd.Function (microseconds per call) but not their work."""
    _, results = ranks
    for rank, result in enumerate(results):
        assert set(result["no_grad"]) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "local_chunk", "to_partial", "grad_all_reduce"}
        for name, (tracked, plain, untracked) in result["no_grad"].items():
            assert untracked, f"rank {rank} {name}: a no_grad call still built a graph"
            torch.testing.assert_close(plain, tracked, rtol=0, atol=0, msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
