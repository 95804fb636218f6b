"""The latent selections every TopK-style formulation shares: TopK of ReLU, AuxK's TopK among dead candidates, and
the TopK over the union of a token's experts (sae.union_topk)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_relu(pre_RM: Tensor, k: int, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """TopK of ReLU(pre): values >= 0 (zeros where fewer than k are positive) and their column indices."""
    values_RK, columns_RK = torch.topk(pre_RM, k, dim=-1, sorted=sorted)
    return F.relu(values_RK), columns_RK


def aux_topk(pre_RM: Tensor, ids_RC: Tensor, dead_RC: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """The top `k_aux` ReLU pre-activations among the dead ones of candidate columns `ids_RC` of each row.

    Candidates that are not dead are masked to -inf: when fewer than `k_aux` are dead, the extra picks are 0 and
    contribute nothing. Sorted, so that the positive picks come in the same order however many padding candidates
    there are (sums over them then round alike). Returns (values_RA, columns_RA) with A = min(k_aux, C).
    """
    aux_pre_RC = pre_RM.gather(1, ids_RC).masked_fill(~dead_RC, float("-inf"))
    values_RA, picks_RA = topk_relu(aux_pre_RC, min(k_aux, ids_RC.shape[1]), sorted=True)
    return values_RA, ids_RC.gather(1, picks_RA)


def union_topk_mask(values_SK: Tensor, gate_TE: Tensor, kept_S: Tensor | None, k: int) -> Tensor:
    """Bool [T * e, k]: the k largest gated candidates p_i * values[i, j] over each token's e rows (token-major).

    `values_SK` holds each (token, expert) row's own TopK (ReLU values, no gradient), `gate_TE` the float32 gates.
    Rows a capacity limit dropped (`kept_S` False) are -inf: never chosen ahead of a real candidate. An exact mask
    of torch.topk's choice, so the selection equals torch.topk over the gated union whatever the ties.
    """
    gated_SK = values_SK * gate_TE.flatten()[:, None]
    if kept_S is not None:
        gated_SK = gated_SK.masked_fill(~kept_S[:, None], float("-inf"))
    gated_TC = gated_SK.view(gate_TE.shape[0], gate_TE.shape[1] * values_SK.shape[1])
    picks_TK = gated_TC.topk(k, dim=1, sorted=False).indices
    return torch.zeros_like(gated_TC, dtype=torch.bool).scatter_(1, picks_TK, True).view_as(values_SK)
