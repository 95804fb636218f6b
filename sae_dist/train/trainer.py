"""The training loop (SPEC section 4): one step, logging, checkpoints and resume.

The trainer owns no distribution logic: every collective goes through the injected `ParallelContext`, which is
the identity on one device and the expert-parallel layout under torchrun.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_dist.config import RunConfig
from sae_dist.data.source import ActivationSource
from sae_dist.eval.metrics import ReconstructionSums
from sae_dist.models import SAEOutput, build_sae
from sae_dist.models.auxk import AuxCandidates, DeadCandidates
from sae_dist.models.kernels import weight_grads_in_place
from sae_dist.models.losses import total_loss
from sae_dist.models.router import expert_counts
from sae_dist.parallel.context import ParallelContext
from sae_dist.train import checkpoint as ckpt
from sae_dist.train.dead import DeadLatentTracker
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.logging import MetricsLogger
from sae_dist.train.optim import (
    build_optimizer,
    build_scheduler,
    clipped_adam_step,
    normalize_decoder_,
    remove_parallel_gradient_,
)

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class Trainer:
    """Trains one SAE on batches from an activation source."""

    def __init__(
        self,
        run: RunConfig,
        source: ActivationSource,
        ctx: ParallelContext | None = None,
        device: torch.device | str = "cpu",
    ):
        self.run = run
        self.source = source
        self.ctx = ctx or ParallelContext()
        self.device = torch.device(device)
        self.d_model = source.d_model
        dispatcher = self.ctx.dispatcher(run.sae.num_experts) if run.sae.kind == "switch" else None
        self.model = build_sae(run.sae, self.d_model, run.trainer.seed, dispatcher).to(self.device)
        self.optimizer = build_optimizer(self.model, run)
        self.scheduler = build_scheduler(self.optimizer, run)
        self.dead = DeadLatentTracker(self.model.num_local_latents, run.sae.dead_tokens, self.device)
        self.run_dir = Path(run.trainer.out_dir)
        self.step = 0
        self.tokens = 0
        self.local_batch = self.ctx.local_batch_size(run.trainer.batch_size)
        self.tokens_per_s = 0.0
        """Training throughput of the last `train()` call, data production included."""
        self._dead_candidates: DeadCandidates | None = None
        """Where AuxK looks at each step; made at the first step (after any resume), since it tracks the counters."""

    # --- one optimisation step -------------------------------------------------------------------------------
    weight_grads_in_place: bool = True
    """Whether the sparse kernels add their weight gradients straight into `.grad` (see `backward`); an engine
    that hooks gradient accumulation (DeepSpeed) sets it False to get them through autograd."""

    def train_step(self, x_TD: torch.Tensor) -> dict[str, Any]:
        """Forward, backward, sync, clip, project decoder gradients, Adam, renormalise decoders.

        The decoder rows are renormalised after each update (the start state is unit norm), which is the spec's
        renormalise-then-forward order shifted by half a step, so a skipped step changes nothing. Returns 'out',
        'terms', 'loss', 'grad_norm', 'lr' and 'finite': a 0-dim bool on the device, False when the batch, the loss
        or the gradient norm was not finite; then no update was applied at all (parameters, Adam moments and
        steps, dead-latent counters). Nothing is read back to the host on one device.
        """
        out, terms, loss = self.forward_loss(x_TD)
        self.backward(loss)
        grad_norm = self.sync_clip_project()
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm) & torch.isfinite(x_TD).all()
        lr = self.update(grad_norm, finite)
        self.renormalize_decoders(finite)
        self.track_dead_latents(out, finite)
        return {"out": out, "terms": terms, "loss": loss.detach(), "grad_norm": grad_norm, "lr": lr,
                "finite": finite}

    def forward_loss(self, x_TD: torch.Tensor) -> tuple[SAEOutput, dict[str, torch.Tensor], torch.Tensor]:
        """(model output, loss terms, total loss) of this rank's tokens, under the configured autocast; AuxK (when
        on) over this step's dead-latent candidates."""
        model = self.model
        aux = self._aux_candidates()
        with self._autocast(), weight_grads_in_place(self.weight_grads_in_place):
            out = model(x_TD) if aux is None else model(x_TD, aux_candidates=aux)
            terms = model.loss_terms(x_TD, out, self.ctx)
            loss = total_loss(terms, model.loss_weights(self.step / self.run.trainer.steps))
        return out, terms, loss

    def backward(self, loss: torch.Tensor) -> None:
        """This rank's gradients of `loss` into `.grad` (replacing the previous step's).

        On a CPU the gradient buffers persist and are zeroed in place: a fresh [M, d] tensor costs more in page
        faults than the sparse backward that fills it. On a GPU the caching allocator makes a fresh one free, and
        setting them to None saves a memset and autograd's accumulation pass.
        """
        self.optimizer.zero_grad(set_to_none=self.device.type != "cpu")
        loss.backward()

    def sync_clip_project(self) -> torch.Tensor:
        """Reduce gradients over ranks, remove each decoder row's gradient component along the row; return the
        global norm, which `update` clips by (fused Adam scales the gradients in its own pass)."""
        self.ctx.sync_gradients(self.model)
        grad_norm = self.ctx.grad_norm(self.model)
        # Clipping scales every gradient alike, so projecting before Adam applies the clip factor is the same.
        for w_dec in self.model.decoder_weights():
            remove_parallel_gradient_(w_dec)
        return grad_norm

    def update(self, grad_norm: torch.Tensor, finite: torch.Tensor) -> float:
        """Adam on the gradients clipped to `trainer.grad_clip` (no update unless `finite`), and the lr schedule's
        step; return the lr used."""
        lr = self.scheduler.get_last_lr()[0]
        clipped_adam_step(self.optimizer, grad_norm, self.run.trainer.grad_clip, finite)
        self.scheduler.step()
        return lr

    def renormalize_decoders(self, apply: torch.Tensor | None = None) -> None:
        """Scale every decoder row to unit norm (not where `apply`, a 0-dim bool, is False)."""
        for w_dec in self.model.decoder_weights():
            normalize_decoder_(w_dec, apply)

    def track_dead_latents(self, out: SAEOutput, finite: torch.Tensor) -> None:
        """Advance the dead-latent counters (not after a skipped step) and AuxK's candidate bookkeeping."""
        fired_L = self.ctx.merge_fired(self.model.fired_latents(out))
        self.dead.update(fired_L, self.run.trainer.batch_size, finite)
        if self._dead_candidates is not None:
            self._dead_candidates.after_update(self.dead.tokens_since_fired_L)

    def _aux_candidates(self) -> AuxCandidates | None:
        """AuxK's candidate latents for this step; None when AuxK is off or no latent can be dead yet."""
        if not self.model.k_aux:
            return None
        if self._dead_candidates is None:
            self._dead_candidates = DeadCandidates(
                self.model.experts.num_local, self.run.sae.dead_tokens, self.run.trainer.batch_size, self.tokens
            )
        return self._dead_candidates.for_step(self.dead.tokens_since_fired_L)

    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.run.trainer.dtype)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # --- statistics ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step_metrics(self, x_TD: torch.Tensor, result: dict[str, Any]) -> dict[str, Any]:
        """Global metrics of one step: every value is reduced over ranks through the context."""
        out = result["out"]
        sums = ReconstructionSums.of_batch(x_TD, out.x_hat_TD, self.model.active_latents(out))
        sums = ReconstructionSums.unpack(self.ctx.all_reduce_sum(sums.pack()))
        world = self.ctx.world_size
        terms = torch.stack([t.detach().float() for t in result["terms"].values()] + [result["loss"].float()])
        terms = self.ctx.all_reduce_sum(terms) / world
        row: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        row["loss"] = float(terms[-1])
        row.update({name: float(value) for name, value in zip(result["terms"], terms[:-1])})
        row.update(sums.metrics())
        num_dead = self.ctx.all_reduce_sum(self.dead.dead_mask().sum().reshape(1).double())
        row["dead"] = int(num_dead) // self.ctx.expert_replicas
        row["dead_fraction"] = row["dead"] / self.run.sae.num_latents
        if out.routing is not None:
            row.update(self._routing_metrics(out))
        row["grad_norm"] = float(result["grad_norm"])
        row["lr"] = result["lr"]
        return row

    def _routing_metrics(self, out: SAEOutput) -> dict[str, Any]:
        """Expert load and, under a capacity limit, the fraction of tokens dropped (overall and per expert)."""
        num_experts = self.run.sae.num_experts
        expert_T = out.routing.expert_T
        dropped_T = expert_T[~out.kept_T] if out.kept_T is not None else expert_T[:0]
        counts = torch.stack([expert_counts(expert_T, num_experts), expert_counts(dropped_T, num_experts)])
        routed_N, dropped_N = self.ctx.all_reduce_sum(counts.double())
        metrics: dict[str, Any] = {"expert_load": (routed_N / routed_N.sum().clamp_min(1)).tolist()}
        if out.kept_T is not None:
            metrics["drop_fraction"] = float(dropped_N.sum() / routed_N.sum().clamp_min(1))
            metrics["drop_fraction_per_expert"] = (dropped_N / routed_N.clamp_min(1)).tolist()
        return metrics

    # --- checkpoints -----------------------------------------------------------------------------------------
    def _tensors(self) -> ckpt.TrainingTensors:
        return ckpt.TrainingTensors(self.model, self.optimizer, self.dead.tokens_since_fired_L)

    def save(self) -> Path:
        """Write a checkpoint (collectively: every rank calls this)."""
        run_state = {"step": self.step, "tokens": self.tokens, "scheduler": self.scheduler.state_dict()}
        rank_state = {"data": self.source.state_dict(), "torch_rng": torch.get_rng_state()}
        return ckpt.save_checkpoint(
            self.run_dir, self.run, self.d_model, self.step, self._tensors(), run_state, rank_state, self.ctx
        )

    def restore(self, folder: Path) -> None:
        """Continue from a checkpoint written on any layout (see `checkpoint` for the data-position rule)."""
        run_state, rank_state = ckpt.load_checkpoint(folder, self._tensors(), self.ctx)
        self.step, self.tokens = run_state["step"], run_state["tokens"]
        self._dead_candidates = None  # its bookkeeping described the counters before the restore
        self.scheduler.load_state_dict(run_state["scheduler"])
        self.source.load_state_dict(rank_state["data"])
        torch.set_rng_state(rank_state["torch_rng"])

    def maybe_resume(self) -> bool:
        """With trainer.resume, continue from the run's latest checkpoint; return whether one was found."""
        if not self.run.trainer.resume:
            return False
        folder = ckpt.latest_checkpoint(self.run_dir)
        if folder is None:
            return False
        self.restore(folder)
        return True

    # --- the loop --------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to `trainer.steps`; return the last logged metrics row."""
        cfg = self.run.trainer
        self.maybe_resume()
        logger = MetricsLogger(self.run_dir, self.step, cfg.tensorboard) if self.ctx.is_main else None
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.ctx.is_main), unit="step"
        )
        last_row: dict[str, Any] = {}
        window_start, window_tokens = time.perf_counter(), 0
        session_start, session_start_tokens = window_start, self.tokens
        while self.step < cfg.steps:
            x_TD = self.source.next_batch(self.local_batch).to(self.device, non_blocking=True)
            if self.step == 0:
                init_biases_from_batch(self.model, self.ctx.gather_rows(x_TD))
            result = self.train_step(x_TD)
            self.step += 1
            self.tokens += cfg.batch_size
            window_tokens += cfg.batch_size
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                last_row = self.step_metrics(x_TD, result)
                now = time.perf_counter()
                last_row["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                bar.set_postfix(loss=f"{last_row['loss']:.4g}", mse=f"{last_row['mse']:.4g}",
                                tok_s=f"{last_row['tokens_per_s']:.3g}")
                if logger is not None:
                    logger.log(last_row)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if logger is not None:
            logger.close()
        self.tokens_per_s = (self.tokens - session_start_tokens) / max(time.perf_counter() - session_start, 1e-9)
        return last_row
