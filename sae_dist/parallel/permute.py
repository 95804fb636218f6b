"""Index arithmetic of the all-to-all dispatch, as pure functions of routing decisions (no communication).

Two permutations surround the exchange. Before it, `send_order` picks the tokens a rank sends, grouped by global
expert (and so by destination rank, since rank j holds experts j*L .. j*L + L - 1), applying the capacity limit.
After it, rows arrive grouped by (source rank, local expert); `group_by_local_expert` regroups them by
(local expert, source rank) so that each local expert's rows are contiguous.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def capacity(capacity_factor: float, tokens: int, num_experts: int) -> int:
    """C = ceil(cf * T_local / N): the most tokens one rank may send to one expert."""
    return math.ceil(capacity_factor * tokens / num_experts)


def exclusive_cumsum(counts: Tensor) -> Tensor:
    """Start offset of each block of a concatenation with `counts` rows per block."""
    return torch.cumsum(counts, 0) - counts


def send_order(
    expert_T: Tensor, num_experts: int, scores_T: Tensor | None = None, limit: int | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The tokens to send, grouped by expert: (token ids [S], tokens sent per expert [N], kept mask [T] or None).

    Within an expert, tokens keep their original order. With a `limit`, each expert keeps its `limit` tokens of
    highest score (ties: the earlier position); the rest are dropped: not sent, and False in the kept mask.
    Without one, every token is sent and the mask is None.
    """
    if limit is None:
        return torch.argsort(expert_T, stable=True), torch.bincount(expert_T, minlength=num_experts), None
    if scores_T is None:
        raise ValueError("a capacity limit needs the router scores to choose which tokens to drop")
    tokens = expert_T.numel()
    # Stable sorts: by score descending (ties keep position order), then by expert.
    by_score = torch.argsort(-scores_T, stable=True)
    ranked = by_score[torch.argsort(expert_T[by_score], stable=True)]
    counts_N = torch.bincount(expert_T, minlength=num_experts)
    starts = torch.repeat_interleave(exclusive_cumsum(counts_N), counts_N, output_size=tokens)
    kept_T = torch.empty(tokens, dtype=torch.bool, device=expert_T.device)
    kept_T[ranked] = torch.arange(tokens, device=expert_T.device) - starts < limit
    kept_ids = kept_T.nonzero().squeeze(1)
    order_S = kept_ids[torch.argsort(expert_T[kept_ids], stable=True)]
    return order_S, torch.bincount(expert_T[kept_ids], minlength=num_experts), kept_T


def group_by_local_expert(counts_PL: Tensor) -> Tensor:
    """Gather indices turning rows laid out by (source rank, local expert) into (local expert, source rank).

    counts_PL[s, l] rows came from source rank s for local expert l, in row-major block order.
    Returns index_R with grouped = received[index_R].
    """
    sources, local_experts = counts_PL.shape
    starts_PL = exclusive_cumsum(counts_PL.flatten()).view(sources, local_experts)
    counts_LP = counts_PL.T.flatten()
    total = int(counts_LP.sum())
    # Row j of output block b comes from input row starts[b] + (j - output_start[b]).
    shift_LP = starts_PL.T.flatten() - exclusive_cumsum(counts_LP)
    rows_R = torch.arange(total, device=counts_PL.device)
    return rows_R + torch.repeat_interleave(shift_LP, counts_LP, output_size=total)
