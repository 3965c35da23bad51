"""The Megatron-LM baseline is found in the graph, not by module names. One process, no ranks.

For each model: exactly which linears of each block are pinned column-parallel (weight split on
output features) and which row-parallel (weight split on input features, output a partial sum),
whatever the modules are called; the baseline's totals on a Hugging Face LLaMA are those of all
seven linears per block split; and a model without attention or MLP gets "not applicable".
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from autotp.capture.export import capture
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.ir.placement import P, R, Shard
from autotp.ir.strategy import MeshStrategy, OpStrategy, one_axis
from autotp.report.table import price_baselines
from autotp.solve.build import build_plan
from autotp.solve.ilp import solve
from autotp.solve.layouts import MegatronLayout, megatron_layout_of
from autotp.strategies.blocks import block_of
from autotp.strategies.engine import StrategySpace, UnsupportedOpWarning, build_strategy_space
from tests._hf_fns import BATCH, SEQ, VOCAB, build_hf_model

TP = 2
LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    ("self_attn.o_proj", "mlp.down_proj"),
)
# model -> (block container, (column linears, row linears) of every block, relative to the block)
EXPECTED: dict[str, tuple[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "gpt": ("blocks", (("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.c_fc"), ("attn.c_proj", "mlp.c_proj"))),
    "llama": ("layers", (
        ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"),
        ("attention.wo", "feed_forward.w2"),
    )),
    "mlp": ("layers", (("fc1",), ("fc2",))),
    # Conv1D (addmm, weight (in, out)); the fused c_attn is left to the solver (see the note test)
    "hf-gpt2": ("transformer.h", (("mlp.c_fc",), ("attn.c_proj", "mlp.c_proj"))),
    "hf-gpt2-eager": ("transformer.h", (("mlp.c_fc",), ("attn.c_proj", "mlp.c_proj"))),
    "hf-llama": ("model.layers", LLAMA_LIKE),
    "hf-llama-eager": ("model.layers", LLAMA_LIKE),  # softmax(QK^T)V instead of sdpa
    "hf-qwen2": ("model.layers", LLAMA_LIKE),  # q/k/v with biases
    "hf-mistral": ("model.layers", LLAMA_LIKE),
    "hf-bert": ("bert.encoder.layer", (
        ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"),
        ("attention.output.dense", "output.dense"),
    )),
}
N_BLOCKS = 2


def _tiny_hf_decoder(family: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Qwen2 and Mistral at the size of ``build_hf_model``'s LLaMA (4 heads, 2 key/value heads)."""
    import transformers

    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_class(
        hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=N_BLOCKS,
        vocab_size=VOCAB, max_position_embeddings=64, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    return model, (torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1)),)


@functools.cache
def _space(name: str) -> StrategySpace:
    if name in ("gpt", "llama", "mlp"):
        model, inputs = build_example(name, device="meta")
    elif name in ("hf-qwen2", "hf-mistral"):
        model, inputs = _tiny_hf_decoder(name.removeprefix("hf-"))
    else:
        model, inputs = build_hf_model(name.removeprefix("hf-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        return build_strategy_space(capture(model, inputs), TP)


def _per_block(space: StrategySpace, layout: MegatronLayout) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``{"model.layers.0": (column linears, row linears)}``, module paths relative to the block."""
    nodes = space.by_name()
    blocks: dict[str, tuple[list[str], list[str]]] = {}
    for side, names in ((0, layout.column), (1, layout.row)):
        for name in names:
            path = nodes[name].module_path
            block = block_of(path)
            key = f"{block[0]}.{block[1]}" if block else "(outside any block)"
            blocks.setdefault(key, ([], []))[side].append(path.removeprefix(key + "."))
    return {key: (tuple(cols), tuple(rows)) for key, (cols, rows) in blocks.items()}


def _weight_split(space: StrategySpace, name: str, strategy: OpStrategy) -> str:
    """``column``/``row`` from where the strategy splits the weight: its output- or input-feature dim."""
    node = space.by_name()[name]
    if node.op.startswith("aten.linear"):  # x @ W.T, W (out, in)
        weight, activation, out_dim = strategy.inputs[1], strategy.inputs[0], 0
    else:  # addmm(bias, x, W), W (in, out): Hugging Face's Conv1D
        assert node.op.startswith("aten.addmm"), node.op
        weight, activation, out_dim = strategy.inputs[2], strategy.inputs[1], 1
    last = Shard(node.slot_metas[0 if node.op.startswith("aten.linear") else 1].ndim - 1)
    if weight == Shard(out_dim) and activation == R and isinstance(strategy.output, Shard):
        return "column"
    if weight == Shard(1 - out_dim) and activation == last and strategy.output == P:
        return "row"
    return f"neither: {strategy}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(EXPECTED))
def test_pins_each_blocks_attention_and_mlp(name: str) -> None:
    space = _space(name)
    layout = megatron_layout_of(space)
    container, expected = EXPECTED[name]
    assert _per_block(space, layout) == {f"{container}.{i}": expected for i in range(N_BLOCKS)}
    assert {n: _weight_split(space, n, s.axis(0)) for n, s in layout.pins.items()} == (
        dict.fromkeys(layout.column, "column") | dict.fromkeys(layout.row, "row")
    )
    assert (layout.n_attention, layout.n_mlp) == ((0 if name == "mlp" else N_BLOCKS), N_BLOCKS)


@pytest.mark.timeout(600)
def test_fused_qkv_is_left_to_the_solver_and_said() -> None:
    """GPT-2's c_attn holds q, k and v as thirds: a contiguous column split is not Megatron's per-head one."""
    space = _space("hf-gpt2")
    layout = megatron_layout_of(space)
    assert not any("c_attn" in space.by_name()[n].module_path for n in layout.pins)
    assert layout.notes == (
        "transformer.h.*.attn.c_attn projects q, k and v with one fused weight: Megatron splits it per head, "
        "which no contiguous split of its output expresses, so it is left to the solver",
    )
    megatron = price_baselines(space, CostModel(resolve_hardware("cpu-gloo"), TP), hardware="cpu-gloo", memory_budget=None)[1]
    assert megatron.plan is not None and layout.notes[0] in megatron.note
    assert megatron.note.startswith(
        "6 linears pinned by graph structure (2 attentions, 2 MLPs): transformer.h.0-1: column mlp.c_fc; row attn.c_proj, mlp.c_proj; "
    )


@pytest.mark.timeout(600)
def test_hf_llama_totals_are_those_of_all_seven_linears_split() -> None:
    """On today's main only q/k/v were pinned ("by GPT module names"): the totals were another layout's."""
    space = _space("hf-llama")
    cost = CostModel(resolve_hardware("h100-sxm"), TP, training=True, optimizer="adamw")
    column_suffixes, row_suffixes = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), ("o_proj", "down_proj")
    expected: dict[str, MeshStrategy] = {}
    for node in space.nodes:
        if node.op.startswith("aten.linear") and node.module_path.endswith(column_suffixes):
            expected[node.name] = one_axis(OpStrategy((R, Shard(0)) + ((Shard(0),) if len(node.slots) == 3 else ()), Shard(2)))
        elif node.op.startswith("aten.linear") and node.module_path.endswith(row_suffixes):
            expected[node.name] = one_axis(OpStrategy((Shard(2), Shard(1)), P))
    assert len(expected) == 7 * N_BLOCKS
    hand = build_plan(space, solve(space, cost, memory_budget=None, pinned=expected).chosen(space), cost, hardware="h100-sxm", memory_budget=None)
    megatron = price_baselines(space, cost, hardware="h100-sxm", memory_budget=None)[1]
    assert megatron.name == "Megatron-LM" and megatron.plan is not None
    assert megatron.note.startswith("14 linears pinned by graph structure (2 attentions, 2 MLPs): model.layers.0-1: column ")
    assert {name: megatron.plan.node(name).strategy for name in expected} == expected
    for total in ("compute_seconds", "comm_seconds", "total_seconds", "comm_bytes_per_rank", "memory_nbytes_per_device"):
        assert getattr(megatron.plan, total) == pytest.approx(getattr(hand, total)), total
    assert megatron.plan.comm_seconds > 0  # the row linears' all-reduces are priced


class _NormedLinears(nn.Module):
    """Linears with a norm between them: no activation joins them and there is no attention."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x)))


def test_no_attention_or_mlp_is_not_applicable() -> None:
    space = build_strategy_space(capture(_NormedLinears(), (torch.randn(2, 4, 32),)), TP)
    assert not megatron_layout_of(space).found
    megatron = price_baselines(space, CostModel(resolve_hardware("cpu-gloo"), TP), hardware="cpu-gloo", memory_budget=None)[1]
    assert megatron.plan is None and megatron.note.startswith("not applicable: the graph has no attention core or MLP")


def test_unsplittable_mlp_is_not_priced_and_names_the_linear() -> None:
    """A hidden size the mesh does not divide has no column split: the baseline says which linear."""
    model, inputs = build_example("mlp", device="meta", d_model=64, d_hidden=255, n_layers=1, batch=2, seq=8)
    space = build_strategy_space(capture(model, inputs), TP)
    megatron = price_baselines(space, CostModel(resolve_hardware("cpu-gloo"), TP), hardware="cpu-gloo", memory_budget=None)[1]
    assert megatron.plan is None
    assert "not priced: Megatron-LM baseline: linear 'linear' (layers.0.fc1, weight (255, 64)) offers no column-parallel" in megatron.note
