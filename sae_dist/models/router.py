"""Top-1 routing (docs/math.md section 2), its top-e generalisation, and the Switch Transformer load-balancing loss
(docs/math.md section 4) over every (token, expert) assignment."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Routing(NamedTuple):
    probs_TN: Tensor
    """Router softmax, float32."""
    expert_TE: Tensor
    """The e highest-probability experts per token, best first (long, no gradient); e = 1: the argmax."""
    gate_TE: Tensor
    """Their probabilities p, float32; the only path by which the reconstruction loss trains the router."""

    @property
    def expert_T(self) -> Tensor:
        """Each token's most probable expert."""
        return self.expert_TE[:, 0]

    @property
    def gate_T(self) -> Tensor:
        """Its probability."""
        return self.gate_TE[:, 0]


class Router(nn.Module):
    """p = softmax(W_router (x - b_router)) in float32, also under autocast; each token's `experts_per_token`
    largest p (e = 1: argmax p)."""

    def __init__(
        self, d_model: int, num_experts: int, generator: torch.Generator | None = None, experts_per_token: int = 1
    ):
        super().__init__()
        self.experts_per_token = experts_per_token
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.b_router = nn.Parameter(torch.zeros(d_model))
        bound = d_model**-0.5  # nn.Linear's default (kaiming_uniform with a=sqrt(5)) bound
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, x_TD: Tensor) -> Routing:
        # Autocast would run this GEMM in bf16/fp16 and change the chosen expert of near-tied tokens.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TN = F.linear(x_TD.float() - self.b_router.float(), self.weight.float())
            probs_TN = logits_TN.softmax(dim=-1)
        if self.experts_per_token == 1:
            expert_TE = probs_TN.argmax(dim=-1, keepdim=True)
        else:
            expert_TE = probs_TN.topk(self.experts_per_token, dim=-1).indices
        return Routing(probs_TN, expert_TE, probs_TN.gather(1, expert_TE))


def expert_counts(expert_T: Tensor, num_experts: int) -> Tensor:
    """Tokens routed to each expert, [N] long; unlike `bincount` it never reads the ids back to the host."""
    counts_N = torch.zeros(num_experts, dtype=torch.long, device=expert_T.device)
    return counts_N.index_add_(0, expert_T, torch.ones_like(expert_T))


def load_balancing_loss(
    routing: Routing, num_experts: int, all_reduce_counts: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """L_lb = N * sum_i f_i P_i; f from hard counts (no gradient), P = mean router probability.

    Under top-e routing f_i is expert i's share of all T * e assignments (sums to 1, so the minimum stays 1 at a
    uniform router whatever e; docs/math.md section 2).

    `all_reduce_counts` sums the [N] counts over ranks for global-batch balancing (expert parallelism); P stays
    local, so averaging this loss's gradient over ranks equals the single-device gradient over the global batch.
    """
    counts_N = expert_counts(routing.expert_TE.flatten(), num_experts).to(torch.float32)
    if all_reduce_counts is not None:
        counts_N = all_reduce_counts(counts_N)
    fraction_N = counts_N / counts_N.sum().clamp_min(1)
    mean_prob_N = routing.probs_TN.mean(dim=0)
    return num_experts * (fraction_N * mean_prob_N).sum()
