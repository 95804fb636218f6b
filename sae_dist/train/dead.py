"""Dead-latent bookkeeping: tokens since each latent last fired (SPEC: dead after 10M tokens).

What counts as a token is `sae.dead_count`: every token of the global batch (the paper), or for a Switch SAE only
the tokens routed to the latent's expert (`routed_tokens_L`), since a latent cannot fire on any other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.models.router import Routing


class DeadLatentTracker:
    """Counts, per local latent, the tokens seen since it last had a positive activation."""

    def __init__(self, num_latents: int, dead_tokens: int, device: torch.device | str = "cpu"):
        self.dead_tokens = dead_tokens
        self.tokens_since_fired_L = torch.zeros(num_latents, dtype=torch.long, device=device)

    def update(self, fired_L: Tensor, tokens: int | Tensor, applied: Tensor | None = None) -> None:
        """Advance every counter by the step's global token count (or per latent, [L]) and reset the latents that
        fired.

        `applied` (0-dim bool): when False the step was skipped, and the counters stay as they were.
        """
        updated_L = (self.tokens_since_fired_L + tokens).masked_fill_(fired_L, 0)
        if applied is not None:
            updated_L = torch.where(applied, updated_L, self.tokens_since_fired_L)
        self.tokens_since_fired_L.copy_(updated_L)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired_L >= self.dead_tokens

    def num_dead(self) -> int:
        return int(self.dead_mask().sum())

    def state_dict(self) -> dict:
        return {"tokens_since_fired": self.tokens_since_fired_L.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_since_fired_L.copy_(state["tokens_since_fired"])


def routed_tokens_L(
    routing: Routing, kept_T: Tensor | None, first_expert: int, num_local: int, latents_per_expert: int, all_reduce_sum
) -> Tensor:
    """Per local latent, the tokens of the global batch that reached its expert: long [num_local * M_e].

    `routing` holds this rank's tokens (under top-e routing, each token's e assignments in token-major order);
    `kept_T` (None = all; one entry per assignment) drops those a capacity limit turned away; `all_reduce_sum` sums
    the per-expert counts over every rank of the global batch (the identity on one device).
    """
    expert_S = routing.expert_TE.flatten()
    kept = torch.ones_like(expert_S) if kept_T is None else kept_T.long()
    num_experts = routing.probs_TN.shape[1]
    counts_N = torch.zeros(num_experts, dtype=torch.long, device=expert_S.device).index_add_(0, expert_S, kept)
    counts_N = all_reduce_sum(counts_N.double()).round().long()
    return counts_N[first_expert : first_expert + num_local].repeat_interleave(latents_per_expert)
