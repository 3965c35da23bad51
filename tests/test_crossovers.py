"""Batch crossovers on a model whose graph changes with the sequence length, and readable reports."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import autotp
from autotp.cost.symbolic import fit_work
from autotp.errors import ConfigError
from autotp.examples import build_example
from autotp.ir.units import fmt_seconds
from autotp.report.crossover import crossovers
from autotp.strategies.engine import NodeKind

BLOCK_SIZE, TP, HARDWARE = 32, 4, "a100-pcie"


class ResidualMLP(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class PositionTableModel(nn.Module):
    """Token and position embeddings, the positions sliced from a table as Hugging Face models do
    (``position_ids[:, :t]``): at ``t == block_size`` the slice is a no-op, and torch.export
    captures an ``alias`` where any shorter sequence gives a ``slice``."""

    def __init__(self, *, vocab_size: int = 256, block_size: int = BLOCK_SIZE, d_model: int = 512, n_layer: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.register_buffer("position_ids", torch.arange(block_size).unsqueeze(0), persistent=False)  # (1, block_size)
        self.blocks = nn.ModuleList(ResidualMLP(d_model) for _ in range(n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(self.position_ids[:, : idx.size(1)])  # (B, T, d_model)
        for block in self.blocks:
            x = block(x)
        return x


def _model_at_full_table() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    with torch.device("meta"):
        model = PositionTableModel()
    return model, (torch.zeros(2, BLOCK_SIZE, dtype=torch.long, device="meta"),)


@pytest.fixture(scope="module")
def report():
    model, inputs = _model_at_full_table()
    return crossovers(model, inputs, mesh_shape=(TP,), hardware=HARDWARE, batch_range=(1, 64))


def test_batch_crossover_holds_the_sequence_at_the_position_table_size(report) -> None:
    """The batch search captures other batch sizes only, so a graph that differs at a shorter
    sequence does not stop it; it still finds replicate -> split."""
    assert report.seq == BLOCK_SIZE
    assert len(report) == 1
    (c,) = report
    assert c.batch_below + 1 == c.batch_above and c.batch_below < c.batch_exact <= c.batch_above
    assert c.below.collectives(backward=True) == [] and c.above.collectives(backward=True) != []
    split = {n.module_path for n in c.above.nodes if n.op.startswith("aten.linear") and n.strategy.divides_output()}
    assert split == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}


def test_fitting_the_sequence_length_names_the_node_that_changes() -> None:
    model, inputs = _model_at_full_table()
    with pytest.raises(ConfigError, match=r"node \d+ is '\w+' \(aten\.alias\.default\) at batch 2, sequence length 32 but '\w+' \(aten\.slice\.Tensor\)") as info:
        fit_work(model, inputs, seq_dim=1)
    assert "pos[:t]" in str(info.value) and "seq_dim=None" in str(info.value)


def test_crossover_report_prints_a_table_with_the_modules_that_change(report) -> None:
    (c,) = report
    text = str(report)
    assert text == report.summary()
    assert f"batch sizes 1..64 at sequence length {BLOCK_SIZE}: 1 crossover" in text
    row = next(line for line in text.splitlines() if line.startswith(f"{c.batch_above} "))
    assert f"{c.batch_exact:.2f}" in row and f"at batch {c.batch_below}, 0 collectives" in row
    assert f"at batch {c.batch_above}, {len(c.above.collectives(backward=True))} collectives" in row
    changes = next(line for line in text.splitlines() if line.startswith(f"at batch {c.batch_above},"))
    assert "blocks.*.fc1 ×2" in changes and "blocks.*.fc2 ×2" in changes and "blocks.0." not in changes
    assert c.changed_modules()[:2] == ["blocks.*.fc1 ×2", "blocks.*.fc2 ×2"]
    assert len(text.splitlines()) < 10 and "Plan(" not in text and "NodePlan" not in text


def test_reprs_are_one_short_line(report) -> None:
    (c,) = report
    for text in (repr(report), repr(c), repr(c.below)):
        assert "\n" not in text and len(text) < 200 and "NodePlan" not in text
    assert repr(report) == f"CrossoverReport(batch 1..64, seq {BLOCK_SIZE}: crossovers at {c.batch_above})"
    assert repr(c).startswith(f"Crossover(batch {c.batch_below} -> {c.batch_above}, ")
    assert f"{len(c.above.collectives(backward=True))} collectives" in repr(c.above)


def test_one_folded_block_keeps_its_path() -> None:
    """A change in one block only is shown with that block's index, not folded."""
    model, inputs = build_example("gpt", device="meta", batch=2, seq=32, n_embd=512, n_head=8, n_layer=1, vocab_size=512, block_size=64)
    (first, *_) = crossovers(model, inputs, mesh_shape=(TP,), hardware=HARDWARE, batch_range=(1, 16))
    assert {"blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj"} <= set(first.changed_modules())
    assert not any("*" in m for m in first.changed_modules())


def test_plan_prints_the_layout_table() -> None:
    model, inputs = build_example("gpt", device="meta", n_layer=3)
    plan = autotp.plan(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget="2MiB")
    assert plan.collectives(backward=True)  # the budget forces a split
    text = str(plan)
    assert re.search(r"^blocks\.[01]-2 ×[23] ", text, re.MULTILINE) and "totals (per step, per device)" in text
    assert "blocks.2" not in text  # the repeats are folded
    assert repr(plan) == (
        f"Plan(mesh (2,) on cpu-gloo, training, {len(plan.nodes)} nodes, "
        f"{sum(1 for n in plan.nodes if n.kind is NodeKind.OP and n.strategy.divides_output())} ops split, "
        f"{len(plan.collectives(backward=True))} collectives, est. {fmt_seconds(plan.total_seconds)}, optimal)"
    )
