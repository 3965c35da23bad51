"""The matmul family, from one einsum-style generator.

Each operand dim gets a letter; sharding a letter shards every operand that has it (at that dim).
A letter kept in the output shards the output there; a contracted letter leaves each rank a
partial sum::

    linear: x[..., k] @ W[n, k].T
      shard n (W on dim 0)  -> column parallel, output S(-1)
      shard k (x S(-1), W S(1)) -> row parallel, output P   (bias must then be P too)
      shard a batch letter  -> data parallel, W replicated

Matmul is linear in each operand, so one ``P`` operand with the rest ``R`` gives ``P``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from autotp.ir.placement import P, Placement, R, Shard
from autotp.ir.values import TensorMeta
from autotp.strategies.rules.registry import OpContext, OpStrategy, register

aten = __import__("torch").ops.aten

_LETTERS = "abcdefghijlmopqrstuvwxyz"  # 'k' and 'n' are reserved for contraction/out features


def einsum_strategies(
    operands: Sequence[str], output: str, metas: Sequence[TensorMeta], *, bias: str | None = None
) -> Iterator[OpStrategy]:
    """Strategies of ``output = einsum(operands) (+ bias)``; ``bias`` labels the last operand.

    An operand whose dim has size 1 where the output's is larger is broadcast: it stays ``R``
    when that letter is sharded.
    """
    labels = list(operands) + ([bias] if bias is not None else [])
    sizes: dict[str, int] = {}
    for label, meta in zip(labels, metas):
        for letter, size in zip(label, meta.shape):
            sizes[letter] = max(sizes.get(letter, 1), size)

    def place(label: str, meta: TensorMeta, letter: str) -> Placement:
        if letter in label and meta.shape[label.index(letter)] == sizes[letter]:
            return Shard(label.index(letter))
        return R

    for letter in sorted(sizes, key=lambda c: (output.find(c) if c in output else 99, c)):
        if letter in output:
            placements = tuple(place(lb, m, letter) for lb, m in zip(labels, metas))
            yield OpStrategy(placements, Shard(output.index(letter)))
        else:  # contracted: operands sharded, bias (which has no contracted letter) must be P
            ins = [place(lb, m, letter) for lb, m in zip(operands, metas)]
            if bias is not None:
                ins.append(P)
            yield OpStrategy(tuple(ins), P)
    n_ops = len(operands)
    for i in range(n_ops):
        ins = [P if j == i else R for j in range(n_ops)]
        if bias is not None:
            ins.append(P)
        yield OpStrategy(tuple(ins), P)


def _batch_letters(count: int) -> str:
    return _LETTERS[:count]


@register(aten.linear)
def linear(ctx: OpContext) -> Iterator[OpStrategy]:
    x = ctx.inputs[0]
    batch = _batch_letters(x.ndim - 1)
    bias = "n" if len(ctx.inputs) == 3 else None
    yield from einsum_strategies([batch + "k", "nk"], batch + "n", ctx.inputs, bias=bias)


@register(aten.mm)
def mm(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from einsum_strategies(["mk", "kn"], "mn", ctx.inputs)


@register(aten.bmm)
def bmm(ctx: OpContext) -> Iterator[OpStrategy]:
    yield from einsum_strategies(["bmk", "bkn"], "bmn", ctx.inputs)


@register(aten.addmm)
def addmm(ctx: OpContext) -> Iterator[OpStrategy]:
    """addmm(bias, a, b) = bias + a @ b; the bias comes first in the argument order."""
    bias_meta, a, b = ctx.inputs
    bias_label = "mn"[2 - bias_meta.ndim:]
    for s in einsum_strategies(["mk", "kn"], "mn", (a, b, bias_meta), bias=bias_label):
        yield OpStrategy((s.inputs[2],) + s.inputs[:2], s.output)


@register(aten.matmul)
def matmul(ctx: OpContext) -> Iterator[OpStrategy]:
    """torch.matmul with broadcast batch dims (1-D operands are left replicated)."""
    a, b = ctx.inputs
    if a.ndim < 2 or b.ndim < 2:
        return
    out_batch = _batch_letters(max(a.ndim, b.ndim) - 2)
    a_label = out_batch[len(out_batch) - (a.ndim - 2):] + "mk"
    b_label = out_batch[len(out_batch) - (b.ndim - 2):] + "kn"
    yield from einsum_strategies([a_label, b_label], out_batch + "mn", ctx.inputs)


@register(aten.baddbmm)
def baddbmm(ctx: OpContext) -> Iterator[OpStrategy]:
    bias_meta, a, b = ctx.inputs
    bias_label = "bmn"[3 - bias_meta.ndim:]
    for s in einsum_strategies(["bmk", "bkn"], "bmn", (a, b, bias_meta), bias=bias_label):
        yield OpStrategy((s.inputs[2],) + s.inputs[:2], s.output)


@register(aten.dot, aten.vdot)
def dot(ctx: OpContext) -> Iterator[OpStrategy]:
    """1-D x 1-D -> scalar: the one letter is contracted (``S(0), S(0) -> P``); ``vdot``
    conjugates its first operand, which is additive, so it is linear in each operand too."""
    yield from einsum_strategies(["k", "k"], "", ctx.inputs)
