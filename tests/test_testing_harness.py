"""The multi-process harness: results by rank, and failures and hangs that end fast and loud."""

from __future__ import annotations

import time

import pytest
import torch

from autotp.testing import RankError, RankTimeoutError, find_free_port, run_on_ranks
from tests import _rank_fns


@pytest.mark.timeout(120)
def test_find_free_port_is_in_range() -> None:
    assert 0 < find_free_port() < 65536


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_all_reduce_sums_ranks(world_size: int) -> None:
    results = run_on_ranks(_rank_fns.all_reduce_rank, world_size)
    assert results == [float(sum(range(world_size)))] * world_size


@pytest.mark.timeout(120)
def test_args_kwargs_env_and_tensor_results_by_rank() -> None:
    results = run_on_ranks(_rank_fns.gather_env, 2, 10.0, offset=0.5)
    for rank, result in enumerate(results):
        assert result["env"] == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        assert result["group"] == (rank, 2)
        assert result["threads"] == 1
        torch.testing.assert_close(result["tensor"], torch.full((2, 3), rank * 10.0 + 0.5))


@pytest.mark.timeout(120)
def test_unpicklable_result_is_a_rank_error() -> None:
    with pytest.raises(RankError, match="rank 0 raised:(.|\n)*pickle"):
        run_on_ranks(_rank_fns.return_lambda, 1, timeout_seconds=60)


@pytest.mark.timeout(120)
def test_rank_exception_is_reported_and_peers_are_killed() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1") as info:
        run_on_ranks(_rank_fns.raise_on_rank_1, 2, timeout_seconds=60)
    assert "boom on rank 1" in str(info.value)
    assert "ValueError" in str(info.value)
    assert not isinstance(info.value, RankTimeoutError)
    assert time.monotonic() - start < 30


@pytest.mark.timeout(120)
def test_hang_raises_timeout_naming_ranks() -> None:
    start = time.monotonic()
    with pytest.raises(RankTimeoutError, match=r"ranks \[0, 1\] of 2 did not report within 10 s"):
        run_on_ranks(_rank_fns.sleep_on_rank_0, 2, timeout_seconds=10)
    assert time.monotonic() - start < 20


@pytest.mark.timeout(120)
def test_silent_exit_is_reported_promptly() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1 exited with code 3 without reporting") as info:
        run_on_ranks(_rank_fns.exit_on_rank_1, 2, timeout_seconds=60)
    assert not isinstance(info.value, RankTimeoutError)
    assert time.monotonic() - start < 30
