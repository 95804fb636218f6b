"""Dead-latent bookkeeping: tokens since each latent last fired (SPEC: dead after 10M tokens)."""

from __future__ import annotations

import torch
from torch import Tensor


class DeadLatentTracker:
    """Counts, per local latent, the tokens seen since it last had a positive activation."""

    def __init__(self, num_latents: int, dead_tokens: int, device: torch.device | str = "cpu"):
        self.dead_tokens = dead_tokens
        self.tokens_since_fired_L = torch.zeros(num_latents, dtype=torch.long, device=device)

    def update(self, fired_L: Tensor, tokens: int, applied: Tensor | None = None) -> None:
        """Advance every counter by the step's global token count and reset the latents that fired.

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
