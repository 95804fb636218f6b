"""Top-1 routing (SPEC section 2) and the Switch Transformer load-balancing loss (SPEC section 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Routing(NamedTuple):
    probs_TN: Tensor
    """Router softmax, float32."""
    expert_T: Tensor
    """argmax expert per token (long, no gradient)."""
    gate_T: Tensor
    """p_{e*}, float32; the only path by which the reconstruction loss trains the router."""


class Router(nn.Module):
    """p = softmax(W_router (x - b_router)) in float32, also under autocast; e* = argmax p."""

    def __init__(self, d_model: int, num_experts: int, generator: torch.Generator | None = None):
        super().__init__()
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
        expert_T = probs_TN.argmax(dim=-1)
        gate_T = probs_TN.gather(1, expert_T[:, None]).squeeze(1)
        return Routing(probs_TN, expert_T, gate_T)


def expert_counts(expert_T: Tensor, num_experts: int) -> Tensor:
    """Tokens routed to each expert, [N] long; unlike `bincount` it never reads the ids back to the host."""
    counts_N = torch.zeros(num_experts, dtype=torch.long, device=expert_T.device)
    return counts_N.index_add_(0, expert_T, torch.ones_like(expert_T))


def load_balancing_loss(
    routing: Routing, num_experts: int, all_reduce_counts: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """L_lb = N * sum_i f_i P_i; f from hard counts (no gradient), P = mean router probability.

    `all_reduce_counts` sums the [N] counts over ranks for global-batch balancing (expert parallelism); P stays
    local, so averaging this loss's gradient over ranks equals the single-device gradient over the global batch.
    """
    counts_N = expert_counts(routing.expert_T, num_experts).to(torch.float32)
    if all_reduce_counts is not None:
        counts_N = all_reduce_counts(counts_N)
    fraction_N = counts_N / counts_N.sum().clamp_min(1)
    mean_prob_N = routing.probs_TN.mean(dim=0)
    return num_experts * (fraction_N * mean_prob_N).sum()
