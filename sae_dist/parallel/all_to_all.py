"""The expert-parallel token dispatcher: tokens travel to the rank holding their expert and back (docs/math.md section
8).

dispatch, on every rank of the expert-parallel group (P ranks, L = N / P experts each):
  1. choose the tokens to send, grouped by global expert (= by destination rank), capped by the capacity limit;
  2. exchange the per-expert counts (all_to_all_single of N integers);
  3. send the token rows with those split sizes (all_to_all_single, differentiable);
  4. regroup the received rows from (source rank, local expert) to (local expert, source rank).
combine reverses 4, 3 (splits swapped) and 1; dropped tokens come back as zero rows. dispatch_like repeats 1, 3 and 4
for another per-token tensor along the same plan. Every rank issues every collective, also with zero rows, so ranks
never wait on a collective another rank skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from sae_dist.models.routing import DispatchPlan, ExpertGroups, TokenDispatcher, inverse_permutation
from sae_dist.parallel.comm import AllToAllRows, CommStats, nbytes
from sae_dist.parallel.permute import capacity, group_by_local_expert, send_order


class AllToAllDispatcher(TokenDispatcher):
    """Experts sharded over `group`: rank j of the group holds global experts j*L .. j*L + L - 1.

    The plan's state is (order_S: token ids in the order they were sent, sent_P, received_P: rows per peer rank,
    ungroup_R: the inverse of the regrouping by local expert).
    """

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

    def dispatch(self, x_TD: Tensor, expert_T: Tensor, scores_T: Tensor | None = None) -> tuple[Tensor, DispatchPlan]:
        tokens = x_TD.shape[0]
        limit = None if self.capacity_factor is None else capacity(self.capacity_factor, tokens, self.num_experts)
        order_S, sent_N, kept_T = send_order(expert_T, self.num_experts, scores_T, limit)
        received_N = torch.empty_like(sent_N)
        dist.all_to_all_single(received_N, sent_N, group=self.group)
        self.stats.add("a2a_counts", nbytes(sent_N))
        sent_P, received_P, received_PL, local_L = self.split_sizes(sent_N, received_N)
        rows_RD = AllToAllRows.apply(x_TD[order_S], received_P, sent_P, self.group, self.stats)
        group_R = group_by_local_expert(received_PL)
        groups = ExpertGroups.from_counts(received_PL.sum(0), rows_RD.shape[0], local_L)
        plan = DispatchPlan(tokens, groups, kept_T, (order_S, sent_P, received_P, inverse_permutation(group_R)))
        return rows_RD[group_R], plan

    def split_sizes(self, sent_N: Tensor, received_N: Tensor) -> tuple[list[int], list[int], Tensor, list[int]]:
        """(rows sent to each peer, rows received from each, received counts [P, L], rows per local expert).

        The one device-to-host copy of the dispatch: the all-to-all needs its split sizes on the host.
        """
        ep_size = self.ep_size
        received_PL = received_N.view(ep_size, self.num_local_experts)
        splits = torch.cat([sent_N.view(ep_size, -1).sum(1), received_PL.sum(1), received_PL.sum(0)]).tolist()
        return splits[:ep_size], splits[ep_size : 2 * ep_size], received_PL, splits[2 * ep_size :]

    def combine(self, y_R: Tensor, plan: DispatchPlan) -> Tensor:
        order_S, sent_P, received_P, ungroup_R = plan.state
        y_S = AllToAllRows.apply(y_R[ungroup_R], sent_P, received_P, self.group, self.stats)
        # Tokens that were not sent (dropped) get zeros.
        return y_S.new_zeros((plan.tokens, *y_S.shape[1:])).index_copy(0, order_S, y_S)

    def dispatch_like(self, y_T: Tensor, plan: DispatchPlan) -> Tensor:
        order_S, sent_P, received_P, ungroup_R = plan.state
        received_R = AllToAllRows.apply(y_T[order_S], received_P, sent_P, self.group, self.stats)
        # grouped[ungroup[i]] = received[i]: the regrouping by local expert of `dispatch`.
        return torch.empty_like(received_R).index_copy(0, ungroup_R, received_R)
