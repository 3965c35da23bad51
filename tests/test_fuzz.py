"""The model fuzzer (issue 21): random models vs their sharded copies, forward to buffers after a step."""
from __future__ import annotations

import pytest
import torch

from autotp.testing import run_on_ranks
from autotp.testing.fuzz import BLOCK_NAMES, FuzzModel, _first_difference, run_cases

# Seeds whose models, together, use every block (asserted below); each was `equal` in the 300-case run.
SAMPLE = {2: [66, 90, 252, 288, 294], 3: [133, 154, 169, 223, 241], 4: [47, 146, 152, 161, 254, 263]}


def test_every_block_is_picked_and_models_are_deterministic() -> None:
    seen: set[str] = set()
    for seed in range(120):
        model = FuzzModel(seed)
        seen.update(model.block_names())
        assert 2 <= len(model.blocks) <= 6
    assert seen == set(BLOCK_NAMES)
    assert len(BLOCK_NAMES) >= 43
    sampled = {name for seeds in SAMPLE.values() for seed in seeds for name in FuzzModel(seed).block_names()}
    assert sampled == set(BLOCK_NAMES), f"the CI sample misses {sorted(set(BLOCK_NAMES) - sampled)}"
    for seed in (3, 17):
        a, b = FuzzModel(seed), FuzzModel(seed)
        assert a.describe() == b.describe()
        assert all(torch.equal(t, b.state_dict()[n]) for n, t in a.state_dict().items())
        (x,) = a.example_inputs()
        assert torch.equal(x, b.example_inputs()[0])
        out = a(x)
        out.float().pow(2).mean().backward()
        assert torch.isfinite(out).all()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())
    assert FuzzModel(3).describe() != FuzzModel(4).describe()


def test_exclude_keeps_blocks_out_and_rejects_unknown_names() -> None:
    exclude = ("ste", "cache_write", "embedding_max_norm")
    for seed in range(60):
        assert not set(FuzzModel(seed, exclude=exclude).block_names()) & set(exclude)
    with pytest.raises(ValueError, match="unknown blocks"):
        FuzzModel(0, exclude=("no_such_block",))


def test_difference_check_allows_rounding_noise_only() -> None:
    expected = torch.tensor([1.0, -2.0, 0.5])
    precise = expected.double()
    assert _first_difference([("w", expected + 1e-5, expected, precise)]) is None
    found = _first_difference([("v", expected, expected, precise), ("w", expected + 1e-2, expected, precise)])
    assert found is not None and found[0] == "w" and "max diff 0.01" in found[1]
    assert _first_difference([("w", expected + 1e-2, expected, precise + 1e-2)]) is None  # within 8x its own float32 noise
    assert _first_difference([("w", expected[:2], expected, precise)]) == ("w", "has shape (2,), expected (3,)")
    counts = torch.tensor([3])
    assert _first_difference([("n", counts + 1, counts, counts)]) == ("n", "differs in 1 elements")


@pytest.mark.timeout(240)
def test_fuzz_sample_on_2_3_and_4_ranks() -> None:
    outcomes = [o for world_size, seeds in SAMPLE.items() for o in run_on_ranks(run_cases, world_size, seeds, timeout_seconds=150)[0]]
    lines = "\n".join(o.line() for o in outcomes)
    assert [o.seed for o in outcomes] == [s for seeds in SAMPLE.values() for s in seeds]
    assert not [o for o in outcomes if o.kind in ("wrong", "untyped")], lines
    assert sum(o.kind == "equal" for o in outcomes) >= 0.7 * len(outcomes), lines  # mostly really sharded
    assert all(o.split_params > 0 for o in outcomes if o.kind == "equal"), lines
