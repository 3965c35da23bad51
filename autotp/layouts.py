"""Hand layouts expressed as pinned strategies, so the ILP prices them under the same model.

``megatron_pins`` reproduces Megatron-LM's MLP/attention layout: column-parallel linears
(weight ``S(0)``, output split on features) feeding row-parallel ones (weight ``S(1)``, output
``P``, all-reduced once per block half).
"""
from __future__ import annotations

from collections.abc import Iterable

from autotp.placement import P, R, Shard
from autotp.rules import OpStrategy
from autotp.strategies import StrategySpace

GPT_COLUMN = ("q_proj", "k_proj", "v_proj", "mlp.c_fc")
GPT_ROW = ("attn.c_proj", "mlp.c_proj")
LLAMA_COLUMN = ("wq", "wk", "wv", "w1", "w3")
LLAMA_ROW = ("wo", "w2")


def megatron_pins(space: StrategySpace, *, column: Iterable[str], row: Iterable[str]) -> dict[str, OpStrategy]:
    """Pin every ``linear`` whose module path ends with a ``column``/``row`` suffix."""
    column, row = tuple(column), tuple(row)
    pins: dict[str, OpStrategy] = {}
    for node in space.nodes:
        if not node.op.startswith("aten.linear") or not node.module_path:
            continue
        x = node.slot_metas[0]
        has_bias = len(node.slots) == 3
        if node.module_path.endswith(column):
            pins[node.name] = OpStrategy((R, Shard(0)) + ((Shard(0),) if has_bias else ()), Shard(x.ndim - 1))
        elif node.module_path.endswith(row):
            pins[node.name] = OpStrategy((Shard(x.ndim - 1), Shard(1)) + ((P,) if has_bias else ()), P)
    return pins
