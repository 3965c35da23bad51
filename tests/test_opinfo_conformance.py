"""Every sharding rule against PyTorch's operator corpus (``autotp.testing.opinfo``).

One run over the whole OpInfo database, one sample per op, at 2, 3 and 5 ranks (about a minute on
two cores): no wrong strategy and no crash outside ``EXPECTED_FAILURES``, with floors on what was
checked so it cannot pass by checking nothing. The smaller tests show the runner catches a wrong
rule, marks expected failures and reports one that no longer fails.
"""
from __future__ import annotations

import pytest
import torch

from autotp.capture.torch_compat import OpOverload, dtensor_registered_ops, opinfo_database
from autotp.ir.placement import Shard
from autotp.strategies.rules.registry import RULES, OpContext, OpStrategy, Rule
from autotp.testing import opinfo
from autotp.testing.opinfo import run_conformance

aten = torch.ops.aten

# Floors at ~90% of what one sample per op gave on torch 2.13 (654 ops captured, 6862 pairs,
# 357 overloads with a split, 275 of the 304 DTensor-registered ones seen): a rule that stops
# offering splits or a capture that starts failing wholesale trips them.
MIN_OPS_CAPTURED = 600
MIN_PAIRS_CHECKED = 6000
MIN_OVERLOADS_SPLIT = 320
# The coverage goal: a split for 90% of the overloads DTensor registers among those the corpus produces.
MIN_DTENSOR_SHARE_SPLIT = 0.9


pytestmark = pytest.mark.usefixtures("one_thread")


def test_accessors_reach_the_corpus_and_dtensors_registry() -> None:
    names = {op.name for op in opinfo_database()}
    assert {"mm", "cumsum", "nn.functional.scaled_dot_product_attention"} <= names
    registered = dtensor_registered_ops()
    assert len(registered) > 1000 and all(isinstance(op, OpOverload) for op in registered)
    assert {aten.mm.default, aten.add.Tensor} <= registered


@pytest.mark.timeout(600)
def test_corpus_has_no_unexpected_wrong_strategy_or_crash(capsys: pytest.CaptureFixture[str]) -> None:
    report = run_conformance(max_samples=1)
    dtensor = {str(op) for op in dtensor_registered_ops()}
    with capsys.disabled():  # the coverage goes into CI's log
        print("\n" + report.summary(dtensor))
    assert report.unexpected("wrong") == [], "\n".join(map(str, report.unexpected("wrong")))
    assert report.unexpected("crash") == [], "\n".join(map(str, report.unexpected("crash")))
    assert report.ops_captured >= MIN_OPS_CAPTURED
    assert report.pairs_checked >= MIN_PAIRS_CHECKED
    assert report.coverage()[0] >= MIN_OVERLOADS_SPLIT
    split, seen = report.coverage(dtensor)
    assert split >= MIN_DTENSOR_SHARE_SPLIT * seen, f"a split for {split} of {seen} DTensor-registered overloads seen"


def _every_dim_splits(ctx: OpContext) -> list[OpStrategy]:
    return [OpStrategy((Shard(d),), Shard(d)) for d in range(ctx.inputs[0].ndim)]


def test_a_wrong_rule_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cumsum rule that splits the scanned dim: every chunk restarts the sum."""
    monkeypatch.setitem(RULES, aten.cumsum.default, Rule(_every_dim_splits))
    report = run_conformance(ops=["cumsum"], tp_sizes=(5,), max_samples=1)
    wrong = report.unexpected("wrong")
    assert wrong and all(p.overload == "aten.cumsum.default" for p in wrong)
    assert report.overloads["aten.cumsum.default"].wrong == len(wrong)


def test_expected_failures_run_and_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(RULES, aten.cumsum.default, Rule(_every_dim_splits))
    monkeypatch.setitem(opinfo.EXPECTED_FAILURES, "cumsum", "a test entry: the scanned dim is split")
    monkeypatch.setitem(opinfo.EXPECTED_FAILURES, "abs", "a test entry that does not fail")
    monkeypatch.setitem(opinfo.EXPECTED_FAILURES, "exp", "a test entry this run does not reach")
    report = run_conformance(ops=["cumsum", "abs"], tp_sizes=(5,), max_samples=1)
    wrong = [p for p in report.problems if p.kind == "wrong"]
    assert wrong and all(p.opinfo == "cumsum" and p.expected for p in wrong)
    assert report.unexpected("wrong") == []
    assert report.expected_passing() == ["abs"]
    assert "exp" not in report.expected_unreached()  # not asked for in this run


def test_cli_prints_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert opinfo.main(["--ops", "mm", "--tp", "2", "3", "--max-samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "ops tried 1, captured 1" in out and "DTensor-registered overloads seen without a split" in out
    with pytest.raises(ValueError, match="no OpInfo named nosuchop"):
        opinfo.main(["--ops", "nosuchop"])
