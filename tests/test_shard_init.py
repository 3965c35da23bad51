"""``init_shards``: each rank's part of a meta model, initialised alone, gathers to the seeded model.

Single process: the replay runs for each mesh coordinate in turn, re-seeded as every rank is.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from autotp.api import plan_model
from autotp.errors import ConfigError
from autotp.examples import EXAMPLES, build_example
from autotp.ir.placement import Placements, Replicate, Shard, chunk_index
from autotp.runtime.shard_init import init_shards
from autotp.runtime.targets import LocalShard, StateTarget, state_targets

SEED = 3
Targets = Callable[[tuple[int, ...]], Sequence[StateTarget]]  # a coordinate -> that rank's targets


def _split(ndim: int, mesh_shape: tuple[int, ...]) -> Placements:
    """Splits that leave no tensor whole: 1-D meshes split the last dim (uneven over 3 ranks: 64,
    256 and inv_freq's 8 do not divide), (2, 2) splits a matrix both ways and a vector twice."""
    if ndim == 0:
        return (Replicate(),) * len(mesh_shape)
    if len(mesh_shape) == 1:
        return (Shard(ndim - 1),)
    return (Shard(0), Shard(ndim - 1))


def _by_hand(model: nn.Module, mesh_shape: tuple[int, ...]) -> Targets:
    """Every parameter and buffer of ``model`` as one target (tied names together), split by ``_split``."""
    by_id: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(tensor), (tensor, []))[1].append(name)

    def targets(coordinate: tuple[int, ...]) -> list[StateTarget]:
        out = []
        for tensor, names in by_id.values():
            placements = _split(tensor.ndim, mesh_shape)
            index = chunk_index(tensor.shape, placements, mesh_shape, coordinate)
            out.append(StateTarget(tuple(names), tuple(tensor.shape), tensor.dtype, LocalShard(placements, index)))
        return out

    return targets


def _gather(meta: nn.Module, targets: Targets, mesh_shape: tuple[int, ...], **kwargs: object) -> dict[str, torch.Tensor]:
    """Run ``init_shards`` for every coordinate (seeded alike) and put the parts together; a part
    two ranks hold (a replicated dim) must be the same on both."""
    full: dict[str, torch.Tensor] = {}
    for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
        torch.manual_seed(SEED)
        mine = targets(coordinate)
        local = init_shards(meta, mine, **kwargs)  # type: ignore[arg-type]
        assert list(local) == [t.name for t in mine]
        for target in mine:
            part = local[target.name]
            assert part.shape == target.shard.shape and part.dtype == target.dtype and part.device.type == "cpu"
            whole = full.setdefault(target.name, torch.full(target.global_shape, float("nan"), dtype=target.dtype))
            seen = whole[target.shard.index]
            assert torch.equal(seen.isnan(), torch.ones_like(seen, dtype=torch.bool)) or torch.equal(seen, part), target.name
            whole[target.shard.index] = part
    return full


def _seeded(name: str) -> tuple[nn.Module, nn.Module]:
    """The example built for real after ``torch.manual_seed(SEED)``, and built on the meta device."""
    model_cls, config_cls = EXAMPLES[name]
    torch.manual_seed(SEED)
    real = model_cls(config_cls())
    with torch.device("meta"):
        meta = model_cls(config_cls())
    return real, meta


def _assert_equals_model(full: dict[str, torch.Tensor], real: nn.Module) -> None:
    state = {**dict(real.named_parameters()), **dict(real.named_buffers())}
    assert set(full) == set(state)
    for name, tensor in state.items():
        assert torch.equal(full[name], tensor), name


def _assert_still_meta(meta: nn.Module) -> None:
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])


@pytest.mark.parametrize("mesh_shape", [(2,), (3,), (2, 2)], ids=str)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_replay_gathers_to_the_seeded_model(name: str, mesh_shape: tuple[int, ...]) -> None:
    real, meta = _seeded(name)
    full = _gather(meta, _by_hand(meta, mesh_shape), mesh_shape, init_fn=None, device=None)
    _assert_equals_model(full, real)
    _assert_still_meta(meta)
    if name == "gpt":
        assert meta.lm_head.weight is meta.wte.weight  # the tie survives the swaps
        assert "lm_head.weight" not in full  # one target, named wte.weight
    if name == "llama":
        assert full["inv_freq"].abs().sum() > 0  # a buffer, recomputed by the root's reset_parameters


def test_replay_of_a_planned_split() -> None:
    """The targets ``state_targets`` makes from a plan that splits GPT (the tied wte/lm_head weight too)."""
    real, meta = _seeded("gpt")
    _, inputs = build_example("gpt", device="meta")
    budget = sum(p.numel() * p.element_size() for p in real.parameters()) * 6 // 10
    planned = plan_model(meta, inputs, mesh_shape=(2,), hardware="h100-sxm", memory_budget=budget, training=False)

    def targets(coordinate: tuple[int, ...]) -> list[StateTarget]:
        return list(state_targets(meta, planned.captured, planned.plan, coordinate).values())

    split = {t.name for t in targets((0,)) if t.shard.shape != t.global_shape}
    assert "wte.weight" in split and len(split) > 10
    _assert_equals_model(_gather(meta, targets, (2,), init_fn=None, device=None), real)


def test_init_fn_gets_each_name_and_where_its_part_lies() -> None:
    _, meta = _seeded("gpt")
    calls: list[tuple[str, tuple[int, ...], torch.Size, LocalShard]] = []

    def arange(name: str, local: torch.Tensor, global_shape: torch.Size, shard: LocalShard) -> None:
        calls.append((name, tuple(local.shape), global_shape, shard))
        local.copy_(torch.arange(global_shape.numel(), dtype=local.dtype).view(global_shape)[shard.index])

    mesh_shape = (3,)
    targets = _by_hand(meta, mesh_shape)
    full = _gather(meta, targets, mesh_shape, init_fn=arange, device=None)
    expected = [(t.name, t.shard.shape, torch.Size(t.global_shape), t.shard) for c in range(3) for t in targets((c,))]
    assert calls == expected
    assert ("wte.weight", (256, 20), torch.Size((256, 64)), LocalShard((Shard(1),), (slice(0, 256), slice(44, 64)))) in calls
    for name, tensor in full.items():
        assert torch.equal(tensor, torch.arange(tensor.numel(), dtype=tensor.dtype).view(tensor.shape)), name


class _Scale(nn.Module):
    """A parameter and no initialiser."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class _Uninitialised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scales = nn.ModuleList(_Scale(4) for _ in range(7))


class _IgnoringInitWeights(_Uninitialised):
    """A Hugging Face-style ``_init_weights`` that sets the linears only."""

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)


@pytest.mark.parametrize("model_cls", [_Uninitialised, _IgnoringInitWeights])
def test_tensors_no_initialiser_sets_are_named(model_cls: type[nn.Module]) -> None:
    with torch.device("meta"):
        meta = model_cls()
    with pytest.raises(ConfigError) as info:
        init_shards(meta, _by_hand(meta, (2,))((0,)), init_fn=None, device=None)
    message = str(info.value)
    assert "7 meta tensor(s)" in message and "scales.0.weight" in message and "and 2 more" in message
    assert "fc." not in message and "scales.6.weight" not in message
    assert "init_fn=" in message and "reset_parameters" in message and "weights=" in message
    _assert_still_meta(meta)


def test_hugging_face_llama_replays_init_weights() -> None:
    """Hugging Face's ``_init_weights`` (found through a wrapper) sets the norms, the rotary
    ``inv_freq`` and N(0, initializer_range) weights, after the linears' own reset_parameters."""
    from tests._hf_fns import WithAttentionMask, build_hf_model

    real, _ = build_hf_model("llama")
    with torch.device("meta"):
        meta = WithAttentionMask(type(real)(real.config))
    mesh_shape = (2,)
    full = _gather(meta, _by_hand(meta, mesh_shape), mesh_shape, init_fn=None, device=None)
    rotary = "model.model.rotary_emb.inv_freq"
    assert torch.equal(full[rotary], real.model.rotary_emb.inv_freq)
    assert torch.equal(full["model.model.norm.weight"], torch.ones(64))
    std = real.config.initializer_range
    for name in ("model.model.layers.0.self_attn.q_proj.weight", "model.model.embed_tokens.weight"):
        assert abs(full[name].std().item() - std) < 0.1 * std, name  # nn.Linear's own init has std 0.072 here
    _assert_still_meta(meta)


def test_gpt_draws_gpt2s_init_per_module() -> None:
    """Drawn by each module as it is built, GPT's init keeps GPT-2's distributions."""
    from autotp.examples import GPT, GPTConfig

    torch.manual_seed(SEED)
    config = GPTConfig(n_embd=256, n_head=4, n_layer=4, vocab_size=512)
    model = GPT(config)
    residual = 0.02 / (2 * config.n_layer) ** 0.5
    for name, param in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            std = residual if name.endswith("c_proj.weight") else 0.02
            assert abs(param.std().item() - std) < 0.05 * std and abs(param.mean().item()) < 0.05 * std, name
    assert model.lm_head.weight is model.wte.weight
