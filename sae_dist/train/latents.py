"""The latent bookkeeping of a run: the dead-latent counters, AuxK's candidate latents that follow them, and
dead-latent resampling on its schedule (the resampling itself: `resample.py`).

A latent is dead after `sae.dead_tokens` tokens without firing (docs/math.md section 2). What counts as a token is
`sae.dead_count`: every token of the global batch (the paper), or for a Switch SAE only the tokens routed to the
latent's expert (`routed_tokens_L`), since a latent cannot fire on any other.

All of it is device work except resampling, which reads the step's finite flag back to the host at the steps of
sae.resample_every only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.config import RunConfig
from sae_dist.models import SAE, SAEOutput
from sae_dist.models.auxk import AuxCandidates, DeadCandidates
from sae_dist.models.routing import Routing
from sae_dist.parallel.context import ParallelContext
from sae_dist.train.resample import resample_dead_latents


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


def resample_due(run: RunConfig, step: int) -> bool:
    """Whether the step numbered `step` (1-based: the steps completed with it) ends with a resampling: a multiple of
    `sae.resample_every` whose next step still runs at the full lr."""
    every = run.sae.resample_every
    full_lr_steps = run.trainer.steps - int(run.trainer.steps * run.trainer.lr_decay_frac)
    return every is not None and step % every == 0 and step <= full_lr_steps


class LatentBookkeeping:
    """Dead-latent counters, AuxK candidates and resampling of one model. `round_width`: AuxK's candidate width
    rounded up to a power of two, so that CUDA graphs see few shapes."""

    def __init__(self, model: SAE, run: RunConfig, ctx: ParallelContext, device: torch.device, round_width: bool):
        self.model, self.run, self.ctx, self.round_width = model, run, ctx, round_width
        self.dead = DeadLatentTracker(model.num_local_latents, run.sae.dead_tokens, device)
        self.resampled = 0
        """Dead latents resampled (sae.resample_every) over the whole run."""
        self._candidates: DeadCandidates | None = None
        """Where AuxK looks at each step; made at the first step (after any resume), since it tracks the counters."""

    def reset(self) -> None:
        """Forget the candidates' bookkeeping: the counters were restored from a checkpoint."""
        self._candidates = None

    def aux_candidates(self, tokens: int) -> AuxCandidates | None:
        """AuxK's candidate latents for this step (`tokens` trained on before it); None when AuxK is off or no latent
        can be dead yet."""
        if not self.model.k_aux:
            return None
        if self._candidates is None:
            self._candidates = DeadCandidates(self.model.num_local_experts, self.run.sae.dead_tokens,
                                              self.run.trainer.batch_size, tokens, round_width=self.round_width)
        return self._candidates.for_step(self.dead.tokens_since_fired_L)

    def track(self, out: SAEOutput, finite: Tensor) -> None:
        """Advance the dead-latent counters by the step's output (not after a skipped step)."""
        fired_L = self.ctx.merge_fired(self.model.fired_latents(out))
        self.dead.update(fired_L, self._counted_tokens(out), finite)

    def after_update(self) -> None:
        """Let AuxK's candidates follow the counters of the step just taken."""
        if self._candidates is not None:
            self._candidates.after_update(self.dead.tokens_since_fired_L)

    def resample(self, rows_TC: Tensor, out: SAEOutput, finite: Tensor, step: int, optimizer: torch.optim.Optimizer
                 ) -> bool:
        """At a step of sae.resample_every (`step`, 1-based) whose update was applied, resample the dead latents
        from this step's batch (the source rows) and reset their rows of `optimizer`'s moments; return whether it
        did."""
        if not resample_due(self.run, step) or not bool(finite):
            return False
        self.resampled += resample_dead_latents(self.model, optimizer, self.dead.tokens_since_fired_L,
                                                self.dead.dead_tokens, self.ctx, rows_TC, out, self.run.trainer.seed,
                                                step)
        return True

    def num_dead(self) -> int:
        """Dead latents over all experts (every rank returns the same)."""
        num_dead = self.ctx.all_reduce_sum(self.dead.dead_mask().sum().reshape(1).double())
        return int(num_dead) // self.ctx.expert_replicas

    def _counted_tokens(self, out: SAEOutput) -> int | Tensor:
        """What this step adds to the dead-latent counters (`sae.dead_count`): the global batch size, or per local
        latent the global batch's tokens routed to its expert."""
        if self.run.sae.dead_count == "tokens":
            return self.run.trainer.batch_size
        experts = self.model.experts
        return routed_tokens_L(out.routing, out.kept_T, experts.first_expert, experts.num_local,
                               self.model.latents_per_expert, self.ctx.all_reduce_sum)
