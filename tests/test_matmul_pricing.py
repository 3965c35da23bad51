"""A matmul's own launch and its weight's fetch: the planner's prices, the symbolic total, and
how calibration calls matmuls (a weight last read a forward ago)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from autotp.capture.export import capture
from autotp.cost.calibrate import _WEIGHT_RING_NBYTES, _as_in_a_layer, _weight_ring
from autotp.cost.model import CostModel, node_weight_nbytes
from autotp.examples import build_example
from autotp.ir.placement import Replicate, Shard
from autotp.strategies.engine import build_strategy_space
from tests.test_op_classes import ROUND

# The op-class tests' round profile (5e11 FLOP/s, 5e10 B/s, launch 1e-5 s) without its floors,
# with a matmul launch and a weight fetch.
WEIGHTY = dataclasses.replace(ROUND, name="round-weighty", op_classes={}, matmul_launch_seconds=3e-6, matmul_weight_bytes_per_s=1e9)


def test_a_batch_split_fetches_the_whole_weight_and_a_weight_split_half() -> None:
    """Halving a linear's tokens halves its FLOPs, not its weight; splitting the weight halves both."""
    model, inputs = build_example("gpt", device="meta", batch=4, seq=16, n_layer=1)
    space = build_strategy_space(capture(model, inputs), 2)
    fc = next(n for n in space.nodes if n.op == "aten.linear.default" and n.slot_metas[1].shape[0] == 4 * n.slot_metas[1].shape[1])
    weight = node_weight_nbytes(fc)
    assert weight == fc.slot_metas[1].numel * 4
    flops = 2.0 * fc.output_meta.numel * fc.slot_metas[0].shape[-1]
    cost = CostModel(WEIGHTY, 2)
    by_batch = next(s for s in fc.strategies if s.axis(0).inputs[:2] == (Shard(0), Replicate()))
    by_column = next(s for s in fc.strategies if s.axis(0).inputs[:2] == (Replicate(), Shard(0)))
    # compute-bound here (FLOPs / 5e11 beat bytes / 5e10), so each price is launch + FLOPs + weight
    assert cost.kernel_seconds(fc, by_batch) == pytest.approx(3e-6 + flops / 2 / 5e11 + weight / 1e9)
    assert cost.kernel_seconds(fc, by_column) == pytest.approx(3e-6 + flops / 2 / 5e11 + weight / 2 / 1e9)
    replicate = next(s for s in fc.strategies if all(p == Replicate() for p in s.axis(0).inputs))
    assert cost.kernel_seconds(fc, replicate) == pytest.approx(3e-6 + flops / 5e11 + weight / 1e9)
    # a profile without the two numbers prices the three by FLOPs and bytes alone, the splits alike
    plain = CostModel(dataclasses.replace(WEIGHTY, matmul_launch_seconds=None, matmul_weight_bytes_per_s=None), 2)
    assert plain.kernel_seconds(fc, by_batch) == pytest.approx(plain.kernel_seconds(fc, by_column))


@pytest.mark.parametrize("training", [False, True])
def test_cost_expression_carries_the_weight_fetch(training: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The symbolic total equals the plan's at the planned size and the planner's price elsewhere."""
    from tests.test_symbolic import assert_expression_prices_as_the_planner, plan_on_a_user_profile

    plan = plan_on_a_user_profile(WEIGHTY, tmp_path, monkeypatch, training=training)
    fetches = [t for t in plan.cost_terms if getattr(t, "seconds_per_weight_byte", 0.0) > 0 and t.weight_nbytes]
    assert len(fetches) >= 4  # the block's linears and the head
    assert_expression_prices_as_the_planner(plan)


def test_calibration_reads_a_new_weight_each_call_from_a_ring_larger_than_a_cache() -> None:
    small = _weight_ring(64, 32, torch.float32, torch.device("cpu"))  # 8 KiB each: capped at 512
    assert len(small) == 512 and len({w.data_ptr() for w in small}) == 512
    assert small[0].shape == (64, 32) and small[0].stride() == (1, 64)  # stored (n, k), transposed as nn.Linear keeps it
    large = _weight_ring(1024, 1024, torch.float32, torch.device("cpu"))  # 4 MiB each
    assert len(large) * 4 * 2**20 == _WEIGHT_RING_NBYTES > 32 * 2**20  # more than the CI VM's 32 MiB L3
    op = _as_in_a_layer(8, 64, 32, torch.float32, torch.device("cpu"))
    first, second = op(), op()
    assert first.shape == (8, 32) and torch.equal(first, second) and first.data_ptr() != second.data_ptr()


def test_merging_the_ranks_keeps_each_matmuls_weight_size() -> None:
    from cost_models.calibrate import KernelSample
    from autotp.cost.calibrate import RankMeasurements, merge

    sample = KernelSample("matmul", "float32", 2.0 * 8 * 64 * 32, 4.0 * (8 * 64 + 64 * 32 + 8 * 32), 0.0, weight_nbytes=4.0 * 64 * 32)
    ranks = [RankMeasurements(kernels=[(sample, [3e-6, 1e-6, 2e-6])], collectives=[]), RankMeasurements(kernels=[(sample, [4e-6, 4e-6, 4e-6])], collectives=[])]
    (merged,), _, _ = merge(ranks)
    assert merged.weight_nbytes == 4.0 * 64 * 32 and merged.seconds == pytest.approx(3e-6)  # median over ranks of each rank's median
