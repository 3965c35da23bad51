"""Built-in example models: shapes, meta-device construction, export, config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autotp.examples import (
    EXAMPLES,
    GPT,
    MLP,
    GPTConfig,
    Llama,
    LlamaConfig,
    MLPConfig,
    build_example,
)

NAMES = sorted(EXAMPLES)

# Production-sized configs; built on meta only. GPT width as in the brief, the others similar.
LARGE: dict[str, dict[str, int]] = {
    "mlp": {"d_model": 4096, "d_hidden": 16384, "n_layers": 4},
    "gpt": {"n_embd": 4096, "n_head": 32, "n_layer": 4, "vocab_size": 50304, "block_size": 1024},
    "llama": {
        "dim": 4096,
        "n_heads": 32,
        "n_kv_heads": 8,
        "n_layers": 4,
        "ffn_hidden": 14336,
        "vocab_size": 128256,
        "max_seq_len": 1024,
    },
}


def _expected_shape(name: str, model: torch.nn.Module, batch: int, seq: int) -> tuple[int, ...]:
    config = model.config
    if name == "mlp":
        return (batch, seq, config.d_model)
    return (batch, seq, config.vocab_size)


@pytest.mark.parametrize("name", NAMES)
def test_small_forward_on_cpu(name: str) -> None:
    model, inputs = build_example(name, batch=3, seq=5)
    assert not model.training
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape == _expected_shape(name, model, 3, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_default_inputs(name: str) -> None:
    _, inputs = build_example(name)
    (x,) = inputs
    if name == "mlp":
        assert x.dtype == torch.float32
        assert x.shape == (2, 8, 64)
    else:
        assert x.dtype == torch.int64
        assert x.shape == (2, 16)
        assert 0 <= int(x.min()) and int(x.max()) < 256


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name: str) -> None:
    model_a, inputs_a = build_example(name, seed=7)
    model_b, inputs_b = build_example(name, seed=7)
    model_c, _ = build_example(name, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(inputs_a, inputs_b))
    state_a, state_b, state_c = model_a.state_dict(), model_b.state_dict(), model_c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


@pytest.mark.parametrize("name", NAMES)
def test_large_on_meta_allocates_nothing(name: str) -> None:
    batch, seq = 8, 1024
    model, inputs = build_example(name, device="meta", batch=batch, seq=seq, **LARGE[name])
    tensors = [*model.parameters(), *model.buffers(), *inputs]
    assert all(t.device.type == "meta" for t in tensors)
    # Shape propagation still works, which is what capture needs.
    out = model(*inputs)
    assert out.device.type == "meta"
    assert out.shape == _expected_shape(name, model, batch, seq)


def test_large_gpt_meta_parameter_count() -> None:
    model, _ = build_example("gpt", device="meta", **LARGE["gpt"])
    n_embd, vocab, block, n_layer = 4096, 50304, 1024, 4
    per_block = 4 * (n_embd * n_embd + n_embd) + 2 * (4 * n_embd * n_embd) + 5 * n_embd + 4 * n_embd
    expected = vocab * n_embd + block * n_embd + n_layer * per_block + 2 * n_embd
    assert sum(p.numel() for p in model.parameters()) == expected


def test_gpt_lm_head_tied_to_wte() -> None:
    model, _ = build_example("gpt")
    assert isinstance(model, GPT)
    assert model.lm_head.weight is model.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_gpt_module_names() -> None:
    model, _ = build_example("gpt", n_layer=1)
    names = {name for name, _ in model.named_modules()}
    expected = {
        "wte", "wpe", "drop", "ln_f", "lm_head",
        "blocks.0.ln_1", "blocks.0.ln_2",
        "blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj",
        "blocks.0.attn.c_proj", "blocks.0.attn.resid_drop",
        "blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj",
    }  # fmt: skip
    assert expected <= names


def test_gpt_is_causal() -> None:
    model, (idx,) = build_example("gpt")
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_llama_grouped_query_attention() -> None:
    model, (idx,) = build_example("llama", n_heads=8, n_kv_heads=2, dim=64)
    assert isinstance(model, Llama)
    attention = model.layers[0].attention
    head_dim = 64 // 8
    assert attention.wq.weight.shape == (8 * head_dim, 64)
    assert attention.wk.weight.shape == (2 * head_dim, 64)
    assert attention.wv.weight.shape == (2 * head_dim, 64)
    with torch.no_grad():
        out = model(idx)
    assert out.shape == (2, 16, 256)
    assert torch.isfinite(out).all()


def test_llama_gqa_matches_repeated_kv_weights() -> None:
    """GQA with kv heads repeated == MHA whose k/v weights are the repeated kv weights."""
    gqa, (idx,) = build_example("llama", n_heads=4, n_kv_heads=2)
    mha, _ = build_example("llama", n_heads=4, n_kv_heads=4)
    head_dim, dim = 16, 64
    state = gqa.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = value.view(2, head_dim, dim)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * head_dim, dim)
    mha.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx))


def test_llama_inv_freq_not_in_state_dict() -> None:
    model, _ = build_example("llama")
    assert "inv_freq" in dict(model.named_buffers())
    assert "inv_freq" not in model.state_dict()


def test_mlp_module_names() -> None:
    model, _ = build_example("mlp", n_layers=3)
    assert isinstance(model, MLP)
    names = {name for name, _ in model.named_modules()}
    assert {f"layers.{i}.{fc}" for i in range(3) for fc in ("fc1", "fc2")} <= names


@pytest.mark.parametrize("name", NAMES)
def test_export(name: str) -> None:
    model, inputs = build_example(name)
    program = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*inputs), model(*inputs))


@pytest.mark.parametrize(
    ("config_cls", "kwargs", "match"),
    [
        (MLPConfig, {"d_model": 0}, "d_model must be positive"),
        (GPTConfig, {"n_embd": 65, "n_head": 4}, "divisible by n_head"),
        (GPTConfig, {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        (GPTConfig, {"vocab_size": -1}, "vocab_size must be positive"),
        (LlamaConfig, {"dim": 64, "n_heads": 5}, "divisible by n_heads"),
        (LlamaConfig, {"n_heads": 4, "n_kv_heads": 3}, "divisible by n_kv_heads"),
        (LlamaConfig, {"dim": 36, "n_heads": 4, "n_kv_heads": 4}, "head_dim .* must be even"),
        (LlamaConfig, {"norm_eps": 0.0}, "norm_eps must be positive"),
    ],
)
def test_bad_config_raises(config_cls: type, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config_cls(**kwargs)


def test_config_replace_revalidates() -> None:
    config = GPTConfig()
    assert dataclasses.replace(config, n_embd=128).n_embd == 128
    with pytest.raises(ValueError, match="divisible by n_head"):
        dataclasses.replace(config, n_head=3)


def test_large_configs_accepted() -> None:
    GPTConfig(n_embd=4096, n_head=32, n_layer=32, vocab_size=50304, block_size=1024)
    LlamaConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=11008
    )


def test_unknown_example_raises() -> None:
    with pytest.raises(ValueError, match="unknown example 'bert'; known examples: mlp, gpt, llama"):
        build_example("bert")


def test_unknown_override_raises() -> None:
    with pytest.raises(TypeError, match="GPTConfig has no field 'n_heads'"):
        build_example("gpt", n_heads=8)


def test_seq_longer_than_block_size_raises() -> None:
    with pytest.raises(ValueError, match="longer than the model's maximum sequence length 64"):
        build_example("gpt", seq=65)
