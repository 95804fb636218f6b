"""The expert-parallel token dispatcher: tokens travel to the rank holding their expert and back (SPEC section 8).

dispatch, on every rank of the expert-parallel group (P ranks, L = N / P experts each):
  1. choose the tokens to send, grouped by global expert (= by destination rank), capped by the capacity limit;
  2. exchange the per-expert counts (all_to_all_single of N integers);
  3. send the token rows with those split sizes (all_to_all_single, differentiable);
  4. regroup the received rows from (source rank, local expert) to (local expert, source rank).
combine reverses 4, 3 (splits swapped) and 1; dropped tokens come back as zero rows. Every rank issues every
collective, also with zero rows, so ranks never wait on a collective another rank skipped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from sae_dist.models.dispatch import TokenDispatcher, inverse_permutation
from sae_dist.parallel.comm import AllToAllRows, CommStats, nbytes
from sae_dist.parallel.permute import capacity, group_by_local_expert, send_order


class _Plan(NamedTuple):
    """What combine() needs to reverse the last dispatch()."""

    tokens: int
    order_S: Tensor
    """Token ids in the order they were sent."""
    kept_T: Tensor | None
    """Tokens within capacity; None when dropless."""
    sent_P: list[int]
    received_P: list[int]
    ungroup_R: Tensor
    """Inverse of the regrouping by local expert."""


class AllToAllDispatcher(TokenDispatcher):
    """Experts sharded over `group`: rank j of the group holds global experts j*L .. j*L + L - 1."""

    def __init__(
        self,
        num_experts: int,
        group: ProcessGroup,
        capacity_factor: float | None = None,
        stats: CommStats | None = None,
    ):
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_local_experts = num_experts // self.ep_size
        self.first_local_expert = dist.get_rank(group) * self.num_local_experts
        self.capacity_factor = capacity_factor
        self.stats = stats or CommStats()
        self._plan: _Plan | None = None

    def dispatch(self, x_TD: Tensor, expert_T: Tensor, scores_T: Tensor | None = None) -> tuple[Tensor, list[int]]:
        tokens, ep_size = x_TD.shape[0], self.ep_size
        limit = None if self.capacity_factor is None else capacity(self.capacity_factor, tokens, self.num_experts)
        order_S, sent_N, kept_T = send_order(expert_T, self.num_experts, scores_T, limit)
        received_N = torch.empty_like(sent_N)
        dist.all_to_all_single(received_N, sent_N, group=self.group)
        self.stats.add("a2a_counts", nbytes(sent_N))
        received_PL = received_N.view(ep_size, self.num_local_experts)
        # One device-to-host copy for every split size.
        splits = torch.cat([sent_N.view(ep_size, -1).sum(1), received_PL.sum(1), received_PL.sum(0)]).tolist()
        sent_P, received_P, local_L = splits[:ep_size], splits[ep_size : 2 * ep_size], splits[2 * ep_size :]
        rows_RD = AllToAllRows.apply(x_TD[order_S], received_P, sent_P, self.group, self.stats)
        group_R = group_by_local_expert(received_PL)
        self._plan = _Plan(tokens, order_S, kept_T, sent_P, received_P, inverse_permutation(group_R))
        return rows_RD[group_R], local_L

    def combine(self, y_R: Tensor) -> Tensor:
        plan = self._plan
        assert plan is not None, "combine() before dispatch()"
        y_S = AllToAllRows.apply(y_R[plan.ungroup_R], plan.sent_P, plan.received_P, self.group, self.stats)
        # Tokens that were not sent (dropped) get zeros.
        return y_S.new_zeros((plan.tokens, *y_S.shape[1:])).index_copy(0, plan.order_S, y_S)

    def kept_T(self) -> Tensor | None:
        return None if self._plan is None else self._plan.kept_T
