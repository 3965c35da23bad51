"""Vocab-parallel embedding, LM head and cross-entropy: chosen at large vocab, and exact."""
from __future__ import annotations

import pytest

from autotp.api import plan_model
from autotp.examples import build_example
from autotp.ir.placement import P, R, Shard
from autotp.testing import run_on_ranks
from tests import _vocab_fns


def _plan(vocab: int):
    model, inputs = build_example("gpt", device="meta", batch=8, seq=512, n_embd=1024, n_head=16, n_layer=2, vocab_size=vocab, block_size=512, targets=True)
    state_nbytes = 4 * sum(p.numel() * p.element_size() for p in model.parameters())  # + grads + AdamW
    return plan_model(model, inputs, mesh_shape=(4,), hardware="h100-sxm", memory_budget=int(state_nbytes / 4 * 1.15)).plan


def _by(plan, predicate):
    (node,) = [n for n in plan.nodes if predicate(n)]
    return node


def test_large_vocab_picks_vocab_parallel_layers() -> None:
    plan = _plan(131072)
    embedding = _by(plan, lambda n: n.module_path == "wte" and n.op.startswith("aten.embedding"))
    head = _by(plan, lambda n: n.module_path == "lm_head")
    loss = _by(plan, lambda n: n.op.startswith("aten.cross_entropy_loss"))
    embedding_s, head_s, loss_s = (n.strategy.axis(0) for n in (embedding, head, loss))
    assert embedding_s.inputs == (Shard(0), R) and embedding_s.output == P
    assert head_s.inputs[1] == Shard(0) and head_s.output == Shard(2)
    assert loss_s.inputs == (Shard(1), R) and loss_s.output == R
    # the (8 x 512 x 131072) logits are never gathered or reduced: no conversion of a tensor that big
    logits_nbytes = 8 * 512 * 131072 * 4
    assert all(c.nbytes < logits_nbytes for _, c in plan.conversions())


def test_small_vocab_does_not_split_the_vocabulary() -> None:
    plan = _plan(1024)
    embedding = _by(plan, lambda n: n.module_path == "wte" and n.op.startswith("aten.embedding"))
    assert embedding.strategy.axis(0).output != P


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_loss_and_gradients_match(world_size: int) -> None:
    reports = run_on_ranks(_vocab_fns.vocab_parallel_equivalence, world_size, timeout_seconds=240)
    for r in reports:
        assert r["pins"] == 3
        actual, expected = r["loss"]
        assert actual == pytest.approx(expected, abs=1e-5)
        assert r["wte_grad_error"] <= 1e-5
        assert r["local_vocab"] == 256 // world_size
        assert "vocab_parallel_embedding" in r["ops"] and "vocab_parallel_cross_entropy" in r["ops"]
