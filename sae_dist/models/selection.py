"""The latent selections every TopK-style formulation shares: TopK of ReLU, and AuxK's TopK among dead candidates."""

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
