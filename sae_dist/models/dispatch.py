"""Token dispatch: how routed tokens reach their experts and how results come back.

The expert code sees only rows grouped by local expert and a list of counts; whether those rows came from a local
sort (`LocalDispatcher`) or from an all-to-all between ranks (`sae_dist.parallel`) is hidden behind this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class TokenDispatcher(ABC):
    """dispatch() groups tokens by expert; combine() returns per-row results to token order.

    combine() may be called several times after one dispatch() (e.g. for reconstructions and latent ids).
    Experts `first_local_expert .. first_local_expert + num_local_experts - 1` (global ids) live here.
    """

    num_local_experts: int
    first_local_expert: int = 0

    @abstractmethod
    def dispatch(self, x_TD: Tensor, expert_T: Tensor, scores_T: Tensor | None = None) -> tuple[Tensor, list[int]]:
        """Return (rows_RD grouped by local expert, rows per local expert).

        `scores_T` (the router probability of each token's expert) ranks tokens when a capacity limit must drop
        some; dispatchers without a limit ignore it.
        """

    @abstractmethod
    def combine(self, y_R: Tensor) -> Tensor:
        """Inverse of the last dispatch for a tensor with one row per dispatched row: [R, ...] -> [T, ...]."""

    def kept_T(self) -> Tensor | None:
        """Mask of tokens that reached an expert in the last dispatch; None for a dropless dispatcher."""
        return None


def inverse_permutation(order: Tensor) -> Tensor:
    """The inverse of a permutation: x[order][inverse] == x."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def sort_by_expert(expert_T: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort of tokens by expert id: (order_T, inverse_T) with x[order][inverse] == x."""
    order_T = torch.argsort(expert_T, stable=True)
    return order_T, inverse_permutation(order_T)


class LocalDispatcher(TokenDispatcher):
    """All experts on this device: a stable sort by expert and its inverse; dropless, so `scores_T` is unused."""

    def __init__(self, num_experts: int):
        self.num_local_experts = num_experts
        self._inverse_T: Tensor | None = None

    def dispatch(self, x_TD: Tensor, expert_T: Tensor, scores_T: Tensor | None = None) -> tuple[Tensor, list[int]]:
        order_T, self._inverse_T = sort_by_expert(expert_T)
        counts = torch.bincount(expert_T, minlength=self.num_local_experts).tolist()
        return x_TD[order_T], counts

    def combine(self, y_R: Tensor) -> Tensor:
        assert self._inverse_T is not None, "combine() before dispatch()"
        return y_R[self._inverse_T]
