"""The metrics row of a training step: loss terms, reconstruction quality (`sae_dist.metrics`), dead latents and,
for a routed SAE, expert load and capacity drops; every value reduced over ranks through the `ParallelContext`, so
every rank computes the same row (rank 0 writes it: `logging.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae_dist.config import RunConfig
from sae_dist.metrics import ReconstructionSums
from sae_dist.models import SAE, SAEOutput
from sae_dist.models.routing import expert_counts
from sae_dist.parallel.context import ParallelContext
from sae_dist.train.latents import LatentBookkeeping
from sae_dist.train.step import StepResult


class StepMetrics:
    """Metrics rows of `model`'s steps (a collective: every rank calls `row`)."""

    def __init__(self, model: SAE, latents: LatentBookkeeping, ctx: ParallelContext, run: RunConfig):
        self.model, self.latents, self.ctx, self.run = model, latents, ctx, run

    @torch.no_grad()
    def row(self, x_TD: Tensor, result: StepResult, step: int, tokens: int) -> dict[str, Any]:
        """The global metrics of the step on this rank's rows `x_TD` (the step's batch) that gave `result`,
        numbered `step` (1-based) with `tokens` trained on by its end."""
        out = result.out
        _, y_TO = self.model.split_batch(x_TD)  # reconstruction against the targets (x for an SAE)
        sums = ReconstructionSums.of_batch(y_TO, out.x_hat_TD, self.model.active_latents(out))
        sums = ReconstructionSums.unpack(self.ctx.all_reduce_sum(sums.pack()))
        terms = torch.stack([t.detach().float() for t in result.terms.values()] + [result.loss.float()])
        terms = self.ctx.all_reduce_sum(terms) / self.ctx.world_size
        row: dict[str, Any] = {"step": step, "tokens": tokens}
        row["loss"] = float(terms[-1])
        row.update({name: float(value) for name, value in zip(result.terms, terms[:-1])})
        row.update(sums.metrics())
        row["dead"] = self.latents.num_dead()
        row["dead_fraction"] = row["dead"] / self.run.sae.num_latents
        if self.run.sae.resample_every is not None:
            row["resampled"] = self.latents.resampled
        if out.routing is not None:
            row.update(self.routing(out))
        row["grad_norm"] = float(result.grad_norm)
        row["lr"] = result.lr
        return row

    def routing(self, out: SAEOutput) -> dict[str, Any]:
        """Expert load and, under a capacity limit, the fraction of routed rows dropped (overall and per expert);
        a row is one (token, chosen expert) pair, so each token counts e times under top-e routing."""
        num_experts = self.run.sae.num_experts
        expert_S = out.routing.expert_TE.flatten()
        dropped_S = expert_S[~out.kept_T] if out.kept_T is not None else expert_S[:0]
        counts = torch.stack([expert_counts(expert_S, num_experts), expert_counts(dropped_S, num_experts)])
        routed_N, dropped_N = self.ctx.all_reduce_sum(counts.double())
        metrics: dict[str, Any] = {"expert_load": (routed_N / routed_N.sum().clamp_min(1)).tolist()}
        if out.kept_T is not None:
            metrics["drop_fraction"] = float(dropped_N.sum() / routed_N.sum().clamp_min(1))
            metrics["drop_fraction_per_expert"] = (dropped_N / routed_N.clamp_min(1)).tolist()
        return metrics
