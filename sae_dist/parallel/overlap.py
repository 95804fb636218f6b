"""The overlapped all-to-all dispatcher: the token exchange in chunks, each transfer hidden behind expert compute.

A rank's tokens are cut into C chunks by position. One exchange of per-(chunk, expert) counts gives every split
size; then every chunk's rows are sent at once (asynchronous all-to-alls, which the process group works through in
order), and the experts run on chunk i as soon as it has arrived, while chunks i+1.. are still in flight. Each
chunk's results start back as soon as they are computed. The backward exchanges are the same collectives with the
splits swapped (torch's functional collectives), issued as autograd reaches them.

The capacity limit is applied to all of a rank's tokens before chunking, so which tokens are dropped does not
depend on C, and every token meets the same expert weights: the result equals the plain dispatcher's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed._functional_collectives import all_to_all_single_autograd

from sae_dist.models.routing import DispatchPlan, ExpertFn, ExpertGroups, ExpertRun, expert_counts, inverse_permutation
from sae_dist.parallel.all_to_all import AllToAllDispatcher
from sae_dist.parallel.comm import CommStats, nbytes
from sae_dist.parallel.permute import capacity, group_by_local_expert, send_order


class OverlappedAllToAllDispatcher(AllToAllDispatcher):
    """`AllToAllDispatcher` whose `run` exchanges tokens in `chunks` pieces, overlapping transfer and compute.

    A plan from `run` has `groups` None (each chunk is grouped by itself) and state (order_S: token ids in the
    order sent, grouped by chunk; per chunk: (sent_P, received_P, ungroup_R)). `dispatch_like` takes plans of the
    plain `dispatch` only: sae.union_topk, which needs it, runs with parallel.a2a_chunks = 1.
    """

    def __init__(
        self,
        num_experts: int,
        group: ProcessGroup,
        chunks: int,
        capacity_factor: float | None = None,
        stats: CommStats | None = None,
    ):
        super().__init__(num_experts, group, capacity_factor, stats)
        self.chunks = chunks

    def _exchange(self, x_RD: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        """Start an all-to-all of rows; the result waits for the transfer when first used."""
        x_RD = x_RD.contiguous()
        row_bytes = nbytes(x_RD[:1]) if x_RD.shape[0] else 0
        kinds = ("a2a", "a2a_backward") if x_RD.requires_grad else ("a2a",)
        for kind in kinds:  # the backward sends the same rows the other way
            self.stats.add(kind, nbytes(x_RD))
            self.stats.add(kind + "_remote", (sum(in_splits) - in_splits[dist.get_rank(self.group)]) * row_bytes)
        return all_to_all_single_autograd(x_RD, out_splits, in_splits, self.group)

    def run(self, x_TD: Tensor, expert_T: Tensor, scores_T: Tensor | None, expert_fn: ExpertFn) -> ExpertRun:
        tokens, chunks, ep_size, local = x_TD.shape[0], self.chunks, self.ep_size, self.num_local_experts
        limit = None if self.capacity_factor is None else capacity(self.capacity_factor, tokens, self.num_experts)
        order_S, _, kept_T = send_order(expert_T, self.num_experts, scores_T, limit)
        chunk_S = order_S * chunks // max(tokens, 1)
        by_chunk = torch.argsort(chunk_S, stable=True)  # grouped by chunk, by expert within a chunk
        order_S, chunk_S = order_S[by_chunk], chunk_S[by_chunk]
        sent_CN = expert_counts(chunk_S * self.num_experts + expert_T[order_S], chunks * self.num_experts)
        sent_PCL = sent_CN.view(chunks, ep_size, local).transpose(0, 1).contiguous()
        received_PCL = torch.empty_like(sent_PCL)
        dist.all_to_all_single(received_PCL, sent_PCL, group=self.group)
        self.stats.add("a2a_counts", nbytes(sent_PCL))
        # The one device-to-host copy: every chunk's split sizes.
        sizes = torch.cat([sent_PCL.sum(2).T.flatten(), received_PCL.sum(2).T.flatten(), received_PCL.sum(0).flatten()])
        sizes = sizes.tolist()
        sent_CP = [sizes[c * ep_size : (c + 1) * ep_size] for c in range(chunks)]
        received_CP = [sizes[(chunks + c) * ep_size : (chunks + c + 1) * ep_size] for c in range(chunks)]
        local_CL = [sizes[2 * chunks * ep_size + c * local : 2 * chunks * ep_size + (c + 1) * local] for c in range(chunks)]

        sent_parts = x_TD[order_S].split([sum(sent) for sent in sent_CP])
        arriving = [self._exchange(part, received_CP[c], sent_CP[c]) for c, part in enumerate(sent_parts)]
        returning, per_row_parts, chunk_states = [], [], []
        for c in range(chunks):
            received_PL = received_PCL[:, c]
            group_R = group_by_local_expert(received_PL)
            rows_RD = arriving[c][group_R]  # waits for chunk c only
            groups = ExpertGroups.from_counts(received_PL.sum(0), rows_RD.shape[0], local_CL[c])
            y_R, per_row = expert_fn(rows_RD, groups)
            ungroup_R = inverse_permutation(group_R)
            returning.append(self._exchange(y_R[ungroup_R], sent_CP[c], received_CP[c]))
            per_row_parts.append(per_row)
            chunk_states.append((sent_CP[c], received_CP[c], ungroup_R))
        plan = DispatchPlan(tokens, None, kept_T, (order_S, chunk_states))
        per_row = tuple(torch.cat(parts) for parts in zip(*per_row_parts))
        return ExpertRun(self._to_tokens(torch.cat(returning), plan), per_row, plan)

    def _to_tokens(self, y_S: Tensor, plan: DispatchPlan) -> Tensor:
        order_S = plan.state[0]
        return y_S.new_zeros((plan.tokens, *y_S.shape[1:])).index_copy(0, order_S, y_S)

    def combine(self, y_R: Tensor, plan: DispatchPlan) -> Tensor:
        if plan.groups is not None:  # a plan of the plain, single-chunk `dispatch`
            return super().combine(y_R, plan)
        _, chunk_states = plan.state
        parts = y_R.split([ungroup_R.numel() for _, _, ungroup_R in chunk_states])
        returning = [
            self._exchange(part[ungroup_R], sent_P, received_P)
            for part, (sent_P, received_P, ungroup_R) in zip(parts, chunk_states)
        ]
        return self._to_tokens(torch.cat(returning), plan)
