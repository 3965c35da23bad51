"""Local implementations of strategies an op cannot run as itself (Megatron-LM's vocab parallelism).

Each takes the rank-local tensors plus ``group_name`` and returns this rank's share of the
result in the placement its rule promises.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from autotp.comm.collectives import _group, all_reduce


def vocab_parallel_embedding(
    weight: torch.Tensor,
    indices: torch.Tensor,
    padding_idx: int = -1,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    *,
    group_name: str,
) -> torch.Tensor:
    """Look up only the ids in this rank's vocab range; other rows stay zero (output ``P``).

    With the table split on the vocab (``S(0)``), rank r holds rows ``[r·v, (r+1)·v)``: each id
    is found on exactly one rank, so the sum over ranks is the full lookup.
    """
    vocab = weight.shape[0]  # this rank's rows
    start = dist.get_rank(_group(group_name)) * vocab
    in_range = (indices >= start) & (indices < start + vocab)
    local = (indices - start).clamp(0, vocab - 1)  # out-of-range rows are masked below
    local_padding = padding_idx - start if 0 <= padding_idx - start < vocab else -1
    out = torch.ops.aten.embedding.default(weight, local, local_padding, scale_grad_by_freq, sparse)
    return out * in_range.unsqueeze(-1).to(out.dtype)  # (..., C)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: int = 1,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    *,
    group_name: str,
) -> torch.Tensor:
    """Cross-entropy over logits split on the class dim, without gathering them (output ``R``).

        loss_i = log Σ_c exp(z_ic - m_i) - (z_i,t_i - m_i),  m_i = max_c z_ic

    Each rank holds classes ``[r·v, (r+1)·v)``: the max, the sum of exponentials and the target
    logit are reduced over ranks (three all-reduces of one value per row). The sums go through
    ``collectives.all_reduce`` (identity backward), so each rank's logits get exactly their slice
    of the gradient; the max is a constant shift and needs none.
    """
    if weight is not None or label_smoothing != 0.0:
        raise ValueError("vocab-parallel cross-entropy supports neither class weights nor label smoothing")
    group = _group(group_name)
    z = logits.movedim(1, -1) if logits.ndim > 1 else logits  # (..., v): classes last
    vocab = z.shape[-1]
    start = dist.get_rank(group) * vocab
    row_max = z.detach().amax(dim=-1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shifted = z - row_max.unsqueeze(-1)
    sum_exp = all_reduce(shifted.exp().sum(dim=-1), group_name)
    valid = target != ignore_index
    in_range = (target >= start) & (target < start + vocab) & valid
    local = (target - start).clamp(0, vocab - 1)
    picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * in_range.to(shifted.dtype)
    target_logit = all_reduce(picked, group_name)
    loss = (torch.log(sum_exp) - target_logit) * valid.to(shifted.dtype)
    if reduction == 0:
        return loss
    if reduction == 2:
        return loss.sum()
    return loss.sum() / valid.sum().to(loss.dtype)
