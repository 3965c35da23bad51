"""Every sharding rule checked by brute force in one process (see ``autotp.rewrite.rule_check``).

For each op node of a small captured model and every strategy the engine offers on 2, 3 and 4
ranks (3 catches uneven cases), the inputs are split per placement, the op runs per rank and the
outputs are reassembled per the output placement and compared with the unsharded result. Shapes
are multiples of 12 where splits should be offered at all three sizes.

The examples sweep (every node of gpt, llama and mlp) is the broadest check; the op table covers
ops and argument forms the examples do not use; the "offers" tests make sure the checks are not
passing vacuously because a rule offers nothing.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autotp.capture.export import CapturedGraph, capture
from autotp.examples import build_example
from autotp.ir.placement import P, Partial, R, Replicate, Shard
from autotp.rewrite.rule_check import (
    check_strategy,
    node_values,
    values_comparable,
)
from autotp.strategies.engine import NodeKind, NodeSpace, StrategySpace, build_strategy_space
from autotp.strategies.rules.registry import OpStrategy
from tests._rule_fns import assert_strategies_hold

TP_SIZES = (2, 3, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- models -------------------------------------------------------------------------------------

class Fn(nn.Module):
    """A model whose forward is ``fn(self, *inputs)``; ``modules`` become its submodules."""

    def __init__(self, fn: Callable[..., Any], **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.fn(self, *inputs)


@dataclass(frozen=True)
class Case:
    """A small model: ``fn(module, *inputs)`` on random float inputs of ``shapes`` (or ``ids``)."""

    fn: Callable[..., Any]
    shapes: tuple[tuple[int, ...], ...]
    modules: Callable[[], dict[str, nn.Module]] = dict
    ids: dict[int, int] = field(default_factory=dict)  # input index -> bound of its int64 ids


def _heads(x: torch.Tensor) -> torch.Tensor:
    # (4, 12, 24) -> (4, 12 heads, 12, 2) -> back to (4, 12, 24)
    y = x.view(4, 12, 12, 2).transpose(1, 2)
    return y.transpose(1, 2).contiguous().view(4, 12, 24) + y.reshape(4, 12, 24)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, n_kv, t, hd = x.shape
    return x[:, :, None, :, :].expand(b, n_kv, n_rep, t, hd).reshape(b, n_kv * n_rep, t, hd)


X3 = (4, 12, 24)  # (B, T, C)
QKV = (4, 12, 12, 8)  # (B, heads, T, head_dim)

CASES: dict[str, Case] = {
    # matmul family
    "linear_bias_3d": Case(lambda m, x: m.fc(x), (X3,), lambda: {"fc": nn.Linear(24, 36)}),
    "linear_nobias_2d": Case(lambda m, x: m.fc(x), ((12, 24),), lambda: {"fc": nn.Linear(24, 12, bias=False)}),
    "matmul_3d_2d": Case(lambda m, x, w: torch.matmul(x, w), (X3, (24, 36))),
    "matmul_4d": Case(lambda m, q, k: q @ k.transpose(-2, -1), (QKV, QKV)),
    "bmm": Case(lambda m, a, b: torch.bmm(a, b), ((12, 12, 24), (12, 24, 12))),
    "mm": Case(lambda m, a, b: torch.mm(a, b), ((12, 24), (24, 36))),
    "addmm_1d_bias": Case(lambda m, c, a, b: torch.addmm(c, a, b), ((36,), (12, 24), (24, 36))),
    "addmm_2d_bias": Case(lambda m, c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0), ((12, 36), (12, 24), (24, 36))),
    "baddbmm": Case(lambda m, c, a, b: torch.baddbmm(c, a, b), ((12, 12, 12), (12, 12, 24), (12, 24, 12))),
    "outer": Case(lambda m, a, b: torch.outer(a, b), ((12,), (24,))),
    # embedding and index ops
    "embedding": Case(lambda m, ids: m.emb(ids), ((4, 12),), lambda: {"emb": nn.Embedding(48, 24)}, {0: 48}),
    "index_select": Case(lambda m, x, idx: x.index_select(1, idx), ((12, 24, 12), (12,)), ids={1: 24}),
    # pointwise with broadcasting, and which of them carry P
    "add_broadcast": Case(lambda m, x, b: x + b, (X3, (24,))),
    "add_tensors": Case(lambda m, x, y: x + y - 2 * y, (X3, X3)),
    "sub_broadcast": Case(lambda m, x, y: x - y, (X3, (12, 1))),
    "mul_scalar": Case(lambda m, x: x * 0.5, (X3,)),
    "add_scalar": Case(lambda m, x: x + 1.0, (X3,)),
    "div_tensor": Case(lambda m, x, y: x / (y.abs() + 1), (X3, (24,))),
    "where": Case(lambda m, x, y: torch.where(x > 0, x, y), (X3, (24,))),
    "masked_fill": Case(
        lambda m, s: s.masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf")).softmax(-1), ((4, 12, 12),)
    ),
    "unary": Case(
        lambda m, x: (F.gelu(x), F.silu(x), F.relu(x), torch.tanh(x), torch.exp(x), torch.sigmoid(x),
                      torch.rsqrt(x.abs() + 1), x.pow(2), -x, torch.sqrt(x.abs()), F.gelu(x, approximate="tanh")),
        (X3,),
    ),
    "casts": Case(lambda m, x: (x.to(torch.float64), x.double().float(), x.type_as(torch.ones(2, dtype=torch.float64))), (X3,)),
    "dropout_eval": Case(lambda m, x: m.drop(x) + F.dropout(x, 0.1, training=False), (X3,), lambda: {"drop": nn.Dropout(0.1)}),
    # softmax, norms, reductions
    "softmax": Case(lambda m, x: (x.softmax(-1), F.log_softmax(x, -1), x.softmax(1)), (X3,)),
    "layer_norm": Case(lambda m, x: m.ln(x) + F.layer_norm(x, (24,)), (X3,), lambda: {"ln": nn.LayerNorm(24)}),
    "rms_norm_pieces": Case(lambda m, x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w, (X3, (24,))),
    "reductions": Case(
        lambda m, x: (x.sum(1), x.sum(-1, keepdim=True), x.sum(), x.mean(1), x.mean(-1, keepdim=True), x.mean(),
                      x.sum((0, 2)), x.amax(-1), x.amin(1, keepdim=True), x.logsumexp(-1), x.argmax(-1)),
        (X3,),
    ),
    "var_std": Case(lambda m, x: (torch.var(x, dim=1), x.std(-1), torch.var(x, -1, unbiased=False, keepdim=True)), ((4, 12, 24, 12),)),
    # views and data movement
    "heads_view": Case(lambda m, x: _heads(x), (X3,)),
    "reshape_flatten": Case(lambda m, x: (x.reshape(48, 24), x.flatten(0, 1), x.unflatten(2, (12, 2)), x.view(4, -1)), (X3,)),
    "transpose_permute": Case(lambda m, x: (x.transpose(0, 2), x.permute(2, 0, 1), x[0].t(), x.unsqueeze(1), x.unsqueeze(-1)), (X3,)),
    "squeeze_dim": Case(lambda m, x: (x.squeeze(-1), x.squeeze(1)), ((12, 1, 24, 1),)),
    "expand": Case(lambda m, x, y: (x.expand(4, 12, 24), y.expand(12, -1, -1)), ((4, 1, 24), (12, 24))),
    "repeat_kv": Case(lambda m, k: _repeat_kv(k, 3), ((4, 4, 12, 8),)),
    "slice_select": Case(lambda m, x: (x[:, :, :12], x[:, 6:], x[..., ::2], x[:, 0], x[1]), (X3,)),
    "split_chunk": Case(lambda m, x: (x.split(12, -1)[1], x.chunk(3, 1)[2], x.split([8, 16], -1)[0], x.unbind(0)[3]), (X3,)),
    "cat_stack": Case(lambda m, x, y: (torch.cat([x, y], -1), torch.cat([x, y], 0), torch.stack([x, y], 1), torch.stack([x, y], -1)), (X3, X3)),
    # attention
    "sdpa_causal": Case(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (QKV, QKV, QKV)),
    "sdpa": Case(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v), (QKV, QKV, QKV)),
    "sdpa_mask": Case(
        lambda m, q, k, v, mask: (F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                  F.scaled_dot_product_attention(q, k, v, attn_mask=mask[0, 0] > 0)),
        (QKV, QKV, QKV, (4, 1, 12, 12)),
    ),
    "sdpa_gqa_repeat": Case(
        lambda m, q, k, v: F.scaled_dot_product_attention(q, _repeat_kv(k, 3), _repeat_kv(v, 3), is_causal=True),
        (QKV, (4, 4, 12, 8), (4, 4, 12, 8)),
    ),
    "sdpa_enable_gqa": Case(
        lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        (QKV, (4, 4, 12, 8), (4, 4, 12, 8)),
    ),
    # constructors and leftovers
    "arange_positions": Case(
        lambda m, ids: m.wte(ids) + m.wpe(torch.arange(ids.size(1), device=ids.device)), ((4, 12),),
        lambda: {"wte": nn.Embedding(48, 24), "wpe": nn.Embedding(12, 24)}, {0: 48},
    ),
    "arange_forms": Case(
        lambda m, x: (x * torch.arange(24, dtype=torch.float32), x * torch.arange(0, 48, 2, dtype=torch.float32),
                      x[0] + torch.arange(3, 15).unsqueeze(1)),
        (X3,),
    ),
    "constructors": Case(
        lambda m, x: (x + torch.full((12, 24), 2.0), x + torch.zeros(12, 24), x + torch.ones(4, 12, 24),
                      x + x.new_ones((12, 24)), x + x.new_zeros((24,)), x + x.new_full((4, 12, 24), 3.0),
                      torch.zeros_like(x), torch.ones_like(x) * x, torch.full_like(x, 7.0)),
        (X3,),
    ),
    "triu_tril": Case(lambda m, x: (torch.triu(x), torch.tril(x, -1), torch.ones(12, 12).triu(1) * x[0]), ((12, 12, 12),)),
    "matmul_2d_3d": Case(lambda m, x, w: torch.matmul(x, w), ((12, 24), (4, 24, 36))),
    "linear_1d": Case(lambda m, x: m.fc(x), ((24,),), lambda: {"fc": nn.Linear(24, 36)}),
    "square_same_node": Case(lambda m, x: x * x + x - x, (X3,)),
    "pointwise_fallback": Case(
        lambda m, x, y: (x.clamp(-0.5, 0.5), x.abs(), torch.maximum(x, y), x.eq(y).float(), x.cos(), 1.0 - x, 1.0 / (x.abs() + 1)),
        (X3, (24,)),
    ),
    "norms_more": Case(
        lambda m, x, w: (F.layer_norm(x, (12, 24)), F.rms_norm(x, (24,), w, 1e-6),
                         torch.native_layer_norm(x, [24], w, w * 0.5, 1e-5)[0]),
        (X3, (24,)),
    ),
    "std_correction": Case(lambda m, x: (torch.std(x, dim=1, correction=0, keepdim=True), torch.var(x, dim=(1, 3), correction=2)), ((4, 12, 24, 12),)),
    "sdpa_cross_mask": Case(
        lambda m, q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        (QKV, (4, 12, 24, 8), (4, 12, 24, 8), (12, 24)),
    ),
    "arange_steps": Case(lambda m, x: (x * torch.arange(24, 0, -2), x * torch.arange(0.0, 1.2, 0.1)), ((12,),)),
    # regressions: squeeze() of a dim whose local size is 1, div with a rounding mode carrying P,
    # a cast of P to int, var/std.dim reading keepdim from the wrong position
    "squeeze_all": Case(lambda m, x: x.squeeze() * 2, ((12, 4, 1),)),
    "div_rounding": Case(lambda m, x, y: (torch.div(x, 0.25, rounding_mode="floor"), torch.div(x, y, rounding_mode="trunc")), (X3, X3)),
    "cast_to_int": Case(lambda m, x: (x * 4).long(), (X3,)),
    "var_keepdim": Case(lambda m, x: (torch.var(x, 1, unbiased=False, keepdim=True), torch.std(x, 1, unbiased=True, keepdim=False)), ((4, 12, 24, 12),)),
    # ops of Hugging Face models (mask construction, token-type lookup, eager attention)
    "index_tensor": Case(
        lambda m, x, i, j, k: (x[i, j], x[:, k], x[k % 4, :, k], x[..., k], x[:, k[:, None], k]),
        (X3, (4, 1), (1, 12), (12,)), ids={1: 4, 2: 12, 3: 12},
    ),
    "index_mask_style": Case(  # transformers' sdpa_mask: ids[batch(B,1,1,1), q(1,1,T,1)] on int tensors
        lambda m, ids, b, q: (ids.cumsum(-1)[b[:, None, None, None], q[None, None, :, None]]
                              == ids.cumsum(-1)[b[:, None, None, None], q[None, None, None, :]]),
        ((4, 12), (4,), (12,)), ids={0: 3, 1: 4, 2: 12},
    ),
    "gather": Case(
        lambda m, x, w, i, j: (torch.gather(x, 2, i), torch.gather(x, 1, j), torch.gather(w, 1, i)),
        ((12, 12, 24), (12, 24, 24), (12, 12, 12), (12, 24, 24)), ids={2: 12, 3: 12},
    ),
    "scans": Case(
        lambda m, x, ids: (x.cumsum(1), x.cumsum(-1, dtype=torch.float64), (x > 0).cumsum(-1), torch.cumprod(x * 0.1 + 1, 1),
                           torch.diff(x, dim=1), torch.diff(x, n=2, dim=-1, prepend=x[..., :1], append=x[..., -2:]),
                           torch.diff(ids, dim=-1, prepend=ids[:, :1] - 1) != 1),
        (X3, (12, 24)), ids={1: 5},
    ),
    "bool_operators": Case(lambda m, x, y: ((x > 0) & (y > 0), (x > 0) | (y < 0), (x > 0) & True), (X3, (24,))),
    "repeat": Case(lambda m, x: (x.repeat(1, 1, 2), x.repeat(2, 1, 1, 1), x.repeat(1, 3, 1)), (X3,)),
    "slice_whole_dim": Case(
        lambda m, x: (torch.ops.aten.slice.Tensor(x, 1, 0, 2**63 - 1), torch.ops.aten.slice.Tensor(x, 2, None, None),
                      torch.ops.aten.slice.Tensor(x, 1, 0, 12), torch.ops.aten.slice.Tensor(x, 1, 0, 6)),
        (X3,),
    ),
    "where_scalar": Case(lambda m, x, y: (torch.where(x > 0, x, 0.0), torch.where(y > 0, -1e9, x), x.masked_fill(y > 0, 0.5)), (X3, (24,))),
}


def _randomize(model: nn.Module, seed: int) -> None:
    """Redraw every parameter at unit-activation scale (N(0, 1/fan_in)).

    A zero bias or a unit LayerNorm weight (their default init) would hide a wrong placement.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(p.shape[-1]))


@functools.cache
def _case(name: str) -> tuple[CapturedGraph, dict[str, Any]]:
    case = CASES[name]
    torch.manual_seed(0)
    model = Fn(case.fn, **case.modules()).eval()
    _randomize(model, seed=1)
    gen = torch.Generator().manual_seed(2)
    inputs = tuple(
        torch.randint(case.ids[i], s, generator=gen) if i in case.ids else torch.randn(s, generator=gen)
        for i, s in enumerate(case.shapes)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, inputs)
    return captured, node_values(captured, model, inputs)


# Example configs whose dims are multiples of 12, so tp_size 3 gets as many splits as 2 and 4.
EXAMPLE_CONFIGS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "gpt": {},
    "llama": {},
    "mlp-12": {"batch": 12, "seq": 12, "d_model": 48, "d_hidden": 96},
    "gpt-12": {"batch": 12, "seq": 12, "n_embd": 48, "n_head": 12, "vocab_size": 96, "block_size": 24},
    "llama-12": {"batch": 12, "seq": 12, "dim": 48, "n_heads": 12, "n_kv_heads": 4, "ffn_hidden": 96,
                 "vocab_size": 96, "max_seq_len": 24},
}


@functools.cache
def _example(config: str) -> tuple[CapturedGraph, dict[str, Any]]:
    model, inputs = build_example(config.split("-")[0], **EXAMPLE_CONFIGS[config])
    _randomize(model, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, inputs)
    return captured, node_values(captured, model, inputs)


def _space(captured: CapturedGraph, tp_size: int) -> StrategySpace:
    """The strategy space on ``tp_size`` ranks, each strategy as the single-axis ``OpStrategy`` the
    rules state (the engine's are 1-D ``MeshStrategy``s; tests/test_rules_nd.py checks N-D ones)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = build_strategy_space(captured, tp_size)
    return replace(space, nodes=tuple(replace(n, strategies=tuple(s.axis(0) for s in n.strategies)) for n in space.nodes))


def _sharded_cases(space: StrategySpace) -> int:
    """(node, strategy) pairs of op nodes that do not replicate everything."""
    return sum(
        1 for n in space.nodes if n.kind is NodeKind.OP
        for s in n.strategies if any(not isinstance(p, Replicate) for p in (*s.inputs, *s.outputs()))
    )


# --- the brute-force sweeps -----------------------------------------------------------------------

@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("config", sorted(EXAMPLE_CONFIGS))
def test_every_strategy_of_every_example_node(config: str, tp_size: int) -> None:
    captured, values = _example(config)
    checked = assert_strategies_hold(captured, values, tp_size=tp_size)
    space = _space(captured, tp_size)
    # every strategy but those run by a communicating local implementation (vocab-parallel
    # embedding), which tests/test_vocab_parallel.py checks on real ranks
    local = sum(1 for n in space.nodes if n.op.startswith("aten.embedding") for s in n.strategies if s.output == P)
    assert checked == sum(len(n.strategies) for n in space.nodes if n.kind is NodeKind.OP) - local
    sharded = _sharded_cases(space)
    # the sweep really splits things (on 3 ranks the default configs can mostly only use P)
    if config.endswith("-12") or tp_size != 3:
        assert sharded >= checked // 2, f"only {sharded} of {checked} strategies split anything"
    else:
        assert sharded > 0


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_of_op(case: str, tp_size: int) -> None:
    captured, values = _case(case)
    assert_strategies_hold(captured, values, tp_size=tp_size)


def test_every_case_has_ops_with_rules_and_comparable_values() -> None:
    for name in CASES:
        captured, _ = _case(name)
        space = _space(captured, 2)
        ops = [n for n in space.nodes if n.kind is NodeKind.OP]
        assert ops, name
        assert not [n.op for n in ops if n.fallback], f"{name}: ops without a rule"
    # no node of the sweeps is checked for shape only (sdpa and eval dropout carry a random tag)
    graphs = [_case(name)[0] for name in CASES] + [_example(config)[0] for config in EXAMPLE_CONFIGS]
    assert all(values_comparable(n) for g in graphs for n in g.graph_module.graph.nodes if n.op == "call_function")


# --- the rules offer what matters (so the sweeps cannot pass vacuously) ---------------------------

def _op_spaces(case: str, tp_size: int, op: str) -> list[NodeSpace]:
    captured, _ = _case(case)
    found = [n for n in _space(captured, tp_size).nodes if n.kind is NodeKind.OP and n.op.startswith(op)]
    assert found, f"{case} has no {op} node"
    return found


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_linear_offers_column_and_row_parallel(tp_size: int) -> None:
    (with_bias,) = _op_spaces("linear_bias_3d", tp_size, "aten.linear")
    # x @ W.T + b, W split on dim 0 == column parallel -> output S(-1); W on dim 1 -> row parallel -> P
    assert OpStrategy((R, Shard(0), Shard(0)), Shard(2)) in with_bias.strategies
    assert OpStrategy((Shard(2), Shard(1), P), P) in with_bias.strategies
    assert (OpStrategy((Shard(0), R, R), Shard(0)) in with_bias.strategies) == (4 % tp_size == 0)  # data parallel
    (no_bias,) = _op_spaces("linear_nobias_2d", tp_size, "aten.linear")
    assert OpStrategy((R, Shard(0)), Shard(1)) in no_bias.strategies
    assert OpStrategy((Shard(1), Shard(1)), P) in no_bias.strategies


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_partial_passes_only_through_linear_pointwise_ops(tp_size: int) -> None:
    (plus_one,) = _op_spaces("add_scalar", tp_size, "aten.add")
    assert not any(isinstance(p, Partial) for s in plus_one.strategies for p in (*s.inputs, *s.outputs()))
    assert OpStrategy((Shard(2),), Shard(2)) in plus_one.strategies
    (times_half,) = _op_spaces("mul_scalar", tp_size, "aten.mul")
    assert OpStrategy((P,), P) in times_half.strategies
    (add,) = _op_spaces("add_broadcast", tp_size, "aten.add")
    assert OpStrategy((P, P), P) in add.strategies
    assert OpStrategy((Shard(1), R), Shard(1)) in add.strategies  # b[C] is broadcast along T
    for op in ("aten.gelu", "aten.silu", "aten.exp", "aten.tanh", "aten.rsqrt", "aten.pow"):
        for space in _op_spaces("unary", tp_size, op):
            assert OpStrategy((P,), P) not in space.strategies, op


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_view_maps_split_dims(tp_size: int) -> None:
    split, merge = _op_spaces("heads_view", tp_size, "aten.view")[:2]
    assert split.slot_metas[0].shape == (4, 12, 24) and split.output_meta.shape == (4, 12, 12, 2)
    assert OpStrategy((Shard(2),), Shard(2)) in split.strategies  # C -> heads: heads stay whole
    assert OpStrategy((Shard(1),), Shard(1)) in split.strategies
    assert merge.output_meta.shape == (4, 12, 24)
    assert OpStrategy((Shard(2),), Shard(2)) in merge.strategies  # heads -> C
    assert OpStrategy((Shard(3),), Shard(2)) not in merge.strategies  # head_dim has no image


def test_indivisible_dims_are_never_split() -> None:
    model = Fn(lambda m, x: F.gelu(m.fc(x)).softmax(-1), fc=nn.Linear(8, 6))
    captured = capture(model, (torch.randn(6, 8),))
    split_six = {2: 0, 3: 0, 4: 0}
    for tp_size in split_six:
        for space in _space(captured, tp_size).nodes:
            metas = (*space.slot_metas, *(space.output_meta if isinstance(space.output_meta, tuple) else (space.output_meta,)))
            for strategy in space.strategies:
                for placement, meta in zip((*strategy.inputs, *strategy.outputs()), metas):
                    if isinstance(placement, Shard):
                        assert meta.shape[placement.dim] % tp_size == 0, (space.name, str(strategy), tp_size)
                        split_six[tp_size] += meta.shape[placement.dim] == 6
    assert split_six[2] > 0 and split_six[3] > 0 and split_six[4] == 0


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_reductions_and_norms_keep_their_dims_whole(tp_size: int) -> None:
    for space in _op_spaces("softmax", tp_size, "aten.softmax")[:1] + _op_spaces("layer_norm", tp_size, "aten.layer_norm"):
        assert OpStrategy((Shard(2),) + (R,) * (len(space.slots) - 1), Shard(2)) not in space.strategies
        assert OpStrategy((Shard(1),) + (R,) * (len(space.slots) - 1), Shard(1)) in space.strategies
    sum_dim1, *_ = _op_spaces("reductions", tp_size, "aten.sum.dim_IntList")
    assert OpStrategy((Shard(1),), P) in sum_dim1.strategies  # chunk sums add up
    assert OpStrategy((Shard(2),), Shard(1)) in sum_dim1.strategies
    mean_dim1, *_ = _op_spaces("reductions", tp_size, "aten.mean.dim")
    assert OpStrategy((Shard(1),), P) not in mean_dim1.strategies  # a chunk's mean is not a summand
    assert OpStrategy((P,), P) in mean_dim1.strategies


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_attention_and_embedding_offer_their_splits(tp_size: int) -> None:
    (causal,) = _op_spaces("sdpa_causal", tp_size, "aten.scaled_dot_product_attention")
    (full,) = _op_spaces("sdpa", tp_size, "aten.scaled_dot_product_attention")
    heads = OpStrategy((Shard(1),) * 3, Shard(1))
    query_seq = OpStrategy((Shard(2), R, R), Shard(2))
    assert heads in causal.strategies and heads in full.strategies
    assert query_seq in full.strategies and query_seq not in causal.strategies
    (gqa,) = _op_spaces("sdpa_enable_gqa", tp_size, "aten.scaled_dot_product_attention")
    assert (heads in gqa.strategies) == (4 % tp_size == 0)  # 4 kv heads
    (emb,) = _op_spaces("embedding", tp_size, "aten.embedding")
    assert OpStrategy((Shard(1), R), Shard(2)) in emb.strategies
    (arange,) = _op_spaces("arange_positions", tp_size, "aten.arange")
    assert OpStrategy((), Shard(0)) in arange.strategies


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_indexing_scans_and_tiling_offer_their_splits(tp_size: int) -> None:
    index, by_column, *_ = _op_spaces("index_tensor", tp_size, "aten.index")
    # x[i(4, 1), j(1, 12)]: C is not indexed; the index's T dim splits j alone (i broadcasts)
    assert OpStrategy((Shard(2), R, R), Shard(2)) in index.strategies
    assert OpStrategy((R, R, Shard(1)), Shard(1)) in index.strategies
    assert OpStrategy((R, Shard(0)), Shard(1)) in by_column.strategies  # x[:, k]: k's chunk
    assert OpStrategy((P, R, R), P) in index.strategies
    gather, *_ = _op_spaces("gather", tp_size, "aten.gather")
    assert OpStrategy((Shard(1), Shard(1)), Shard(1)) in gather.strategies
    assert OpStrategy((R, Shard(2)), Shard(2)) in gather.strategies
    assert OpStrategy((Shard(2), Shard(2)), Shard(2)) not in gather.strategies  # the gathered dim
    cumsum, *_ = _op_spaces("scans", tp_size, "aten.cumsum")
    assert OpStrategy((Shard(2),), Shard(2)) in cumsum.strategies and OpStrategy((P,), P) in cumsum.strategies
    assert OpStrategy((Shard(1),), Shard(1)) not in cumsum.strategies  # the scanned dim
    tile, *_ = _op_spaces("repeat", tp_size, "aten.repeat")
    assert OpStrategy((Shard(1),), Shard(1)) in tile.strategies
    assert OpStrategy((Shard(2),), Shard(2)) not in tile.strategies  # tiled twice
    whole, _, _, half = _op_spaces("slice_whole_dim", tp_size, "aten.slice")
    assert OpStrategy((Shard(1),), Shard(1)) in whole.strategies
    assert OpStrategy((Shard(1),), Shard(1)) not in half.strategies
    (both,) = _op_spaces("bool_operators", tp_size, "aten.__and__.Tensor")
    assert OpStrategy((Shard(2), Shard(0)), Shard(2)) in both.strategies


# --- the checker itself catches wrong strategies ----------------------------------------------------

WRONG: tuple[tuple[str, str, OpStrategy], ...] = (
    ("linear_bias_3d", "aten.linear", OpStrategy((Shard(2), Shard(1), R), P)),  # bias added tp times
    ("linear_bias_3d", "aten.linear", OpStrategy((R, Shard(0), R), Shard(2))),  # bias not split
    ("softmax", "aten.softmax", OpStrategy((Shard(2),), Shard(2))),  # normalises each chunk alone
    ("unary", "aten.gelu", OpStrategy((P,), P)),  # gelu is not linear
    ("add_scalar", "aten.add", OpStrategy((P,), P)),  # adds 1.0 once per rank
    ("reductions", "aten.mean.dim", OpStrategy((Shard(1),), P)),  # chunk means do not add up
    ("heads_view", "aten.view", OpStrategy((Shard(1),), Shard(2))),  # wrong image of T
    ("embedding", "aten.embedding", OpStrategy((Shard(0), R), Shard(2))),  # vocab split is not a C split
    ("sdpa_causal", "aten.scaled_dot_product_attention", OpStrategy((Shard(2), R, R), Shard(2))),  # mask offset
    ("transpose_permute", "aten.transpose", OpStrategy((Shard(0),), Shard(0))),  # dim 0 moved to 2
    ("index_tensor", "aten.index", OpStrategy((Shard(1), R, R), Shard(1))),  # T is indexed
    ("gather", "aten.gather", OpStrategy((R, Shard(0)), Shard(0))),  # index rows meet the wrong x rows
    ("scans", "aten.cumsum", OpStrategy((Shard(1),), Shard(1))),  # each chunk restarts the sum
    ("repeat", "aten.repeat", OpStrategy((Shard(2),), Shard(2))),  # tiles the chunk, not the whole
)


@pytest.mark.parametrize("case,op,strategy", WRONG, ids=[f"{c}-{s}" for c, _, s in WRONG])
def test_checker_rejects_wrong_strategy(case: str, op: str, strategy: OpStrategy) -> None:
    captured, values = _case(case)
    space = _op_spaces(case, 2, op)[0]
    node = next(n for n in captured.graph_module.graph.nodes if n.name == space.name)
    reason = check_strategy(node, space, strategy, values, tp_size=2, generator=torch.Generator().manual_seed(0))
    assert reason is not None


class _TwoTransposes(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.transpose(0, 1), x.transpose(1, 2)


def test_calls_that_differ_only_in_arguments_get_their_own_strategies() -> None:
    """The engine asks the rules once per distinct call and reuses the answer (repeated layers);
    two transposes of the same tensor differ only in their dim arguments, so each keeps its own."""
    space = _space(capture(_TwoTransposes(), (torch.randn(4, 4, 4),)), 2)
    first, second = (n for n in space.nodes if n.op == "aten.transpose.int")
    assert OpStrategy((Shard(0),), Shard(1)) in first.strategies and OpStrategy((Shard(0),), Shard(0)) not in first.strategies
    assert OpStrategy((Shard(0),), Shard(0)) in second.strategies and OpStrategy((Shard(1),), Shard(2)) in second.strategies
