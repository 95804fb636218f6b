"""The latent bookkeeping of a run: the dead-latent counters (`dead.py`), AuxK's candidate latents that follow them,
and dead-latent resampling on its schedule (`resample.py`).

All of it is device work except resampling, which reads the step's finite flag back to the host at the steps of
sae.resample_every only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.config import RunConfig
from sae_dist.models import SAE, SAEOutput
from sae_dist.models.auxk import AuxCandidates, DeadCandidates
from sae_dist.parallel.context import ParallelContext
from sae_dist.train.dead import DeadLatentTracker, routed_tokens_L
from sae_dist.train.resample import resample_dead_latents, resample_due


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
        self.resampled += resample_dead_latents(self.model, optimizer, self.dead, self.ctx, rows_TC, out,
                                                self.run.trainer.seed, step)
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
