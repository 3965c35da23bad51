"""One plan per job: rank 0 plans, every rank checks graph, plan and versions, and all raise alike.

On 2 gloo ranks: a disagreement is a PlanMismatchError on every rank naming the rank and what
differs; rank 0's planning failure is its own error on rank 0 and a PeerRankError elsewhere; a
rank that does not arrive is a SetupTimeoutError, not a hang; and a rank that would plan
differently still runs rank 0's plan.
"""
from __future__ import annotations

import pytest

from autotp.errors import PeerRankError, PlanMismatchError
from autotp.runtime.agreement import GraphSummary, RankFailure, RankReport, _graph_difference, plan_digest, settle
from autotp.testing import run_on_ranks
from tests import _agreement_fns


@pytest.mark.timeout(180)
def test_different_input_shapes_raise_on_every_rank_naming_rank_and_shapes() -> None:
    outcomes = run_on_ranks(_agreement_fns.shapes_differ, 2, timeout_seconds=150)
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == "PlanMismatchError", (rank, kind, message)
        assert "rank 1: input_ids is int64[2,8], rank 0 planned int64[2,16]" in message, (rank, message)


@pytest.mark.timeout(180)
def test_different_autotp_versions_are_named() -> None:
    outcomes = run_on_ranks(_agreement_fns.versions_differ, 2, timeout_seconds=150)
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == "PlanMismatchError", (rank, kind, message)
        assert "rank 1: autotp 0.0.0-other, rank 0 runs autotp " in message, (rank, message)


@pytest.mark.timeout(180)
def test_rank0_planning_failure_is_typed_on_every_rank() -> None:
    (kind0, message0), (kind1, message1) = run_on_ranks(_agreement_fns.rank0_infeasible, 2, timeout_seconds=150)
    assert kind0 == "InfeasiblePlanError", message0  # rank 0 raises its own error
    assert kind1 == "PeerRankError", message1
    assert message1.startswith("rank 0 failed: InfeasiblePlanError: ") and message0 in message1


@pytest.mark.timeout(180)
def test_only_rank0_plans_so_a_rank_that_would_plan_differently_runs_the_same_plan() -> None:
    reports = run_on_ranks(_agreement_fns.only_rank0_plans, 2, timeout_seconds=150)
    assert [r["own_solves"] for r in reports] == [0, 0]  # rank 1's (different) solver never ran
    assert reports[0]["digest"] == reports[1]["digest"]
    assert reports[0]["split"] and reports[0]["split"] == reports[1]["split"]  # the budget forced splits


@pytest.mark.timeout(180)
def test_a_rank_that_does_not_arrive_is_a_timeout_error_not_a_hang() -> None:
    outcomes = run_on_ranks(_agreement_fns.rank0_too_slow, 2, timeout_seconds=150)
    kind1, message1, seconds1 = outcomes[1]
    assert kind1 == "SetupTimeoutError", message1
    assert "setup_timeout_s=2 s" in message1 and "receiving rank 0's plan" in message1
    assert seconds1 < 30, seconds1  # bounded by the set-up timeout, not the 150 s process-group one
    assert outcomes[0][0] == "SetupTimeoutError", outcomes[0]  # rank 0 arrives to find rank 1 gone


def test_settle_raises_alike_for_the_same_reports() -> None:
    """The decision is a function of the gathered reports: every rank raises the same error."""
    reports = [RankReport(0, (), "sha256:aa", None), RankReport(1, (), "sha256:bb", None)]
    with pytest.raises(PlanMismatchError, match=r"rank 1 was given another plan than rank 0"):
        settle(reports, None)
    failed = [RankReport(0, (), None, RankFailure(0, "CaptureError", "could not capture")), RankReport(1, (), None, None)]
    with pytest.raises(PeerRankError, match=r"^rank 0 failed: CaptureError: could not capture during"):
        settle(failed, None)
    with pytest.raises(KeyError):  # the failing rank re-raises its own error
        settle(failed, KeyError("own"))
    settle([RankReport(0, (), "sha256:aa", None), RankReport(1, (), "sha256:aa", None)], None)


def test_graph_difference_names_every_differing_input() -> None:
    root = GraphSummary("sha256:1", (("parameter 'up.weight'", "float32[128,32]"), ("input_ids", "int64[2,16]")))
    mine = GraphSummary("sha256:2", (("parameter 'up.weight'", "float32[64,32]"), ("input_ids", "int64[2,16]"), ("mask", "bool[2,16]")))
    assert _graph_difference(2, mine, root, "planned") == (
        "rank 2: parameter 'up.weight' is float32[64,32], rank 0 planned float32[128,32], mask is bool[2,16], rank 0 has no such input"
    )
    assert _graph_difference(2, root, root, "planned") is None


def test_the_same_plan_solved_on_each_rank_has_one_digest() -> None:
    """Each rank solving the same plan takes its own time (regression: ``benchmarks.tp_vs_dtensor``
    plans on every rank and was refused); a plan with other strategies still differs."""
    import dataclasses

    import autotp
    from autotp.examples import build_example

    model, inputs = build_example("mlp", device="meta")
    split = autotp.plan(model, inputs, mesh_shape=2, hardware="h100-sxm", memory_budget="600KiB")  # replicated needs 1034 KiB
    assert plan_digest(dataclasses.replace(split, solve_seconds=split.solve_seconds + 1.5)) == plan_digest(split)
    whole = autotp.plan(model, inputs, mesh_shape=2, hardware="h100-sxm")
    assert [n.strategy for n in whole.nodes] != [n.strategy for n in split.nodes]
    assert plan_digest(whole) != plan_digest(split)
