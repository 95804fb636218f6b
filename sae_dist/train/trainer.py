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
from sae_dist.models.losses import total_loss
from sae_dist.models.router import expert_counts
from sae_dist.parallel.context import ParallelContext
from sae_dist.train import checkpoint as ckpt
from sae_dist.train.dead import DeadLatentTracker
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.logging import MetricsLogger
from sae_dist.train.optim import build_optimizer, build_scheduler, normalize_decoder_, remove_parallel_gradient_

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
        self.optimizer, self.scheduler = self.build_optimizer()
        self.dead = DeadLatentTracker(self.model.num_local_latents, run.sae.dead_tokens, self.device)
        self.run_dir = Path(run.trainer.out_dir)
        self.step = 0
        self.tokens = 0
        self.local_batch = self.ctx.local_batch_size(run.trainer.batch_size)
        self.tokens_per_s = 0.0
        """Training throughput of the last `train()` call, data production included."""

    def build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam over every parameter and the lr schedule (an engine that owns the optimizer replaces this)."""
        optimizer = build_optimizer(self.model, self.run)
        return optimizer, build_scheduler(optimizer, self.run)

    # --- one optimisation step -------------------------------------------------------------------------------
    def train_step(self, x_TD: torch.Tensor) -> dict[str, Any]:
        """Renormalise decoders, forward, backward, sync, clip, project decoder gradients, Adam step."""
        self.renormalize_decoders()
        out, terms, loss = self.forward_loss(x_TD)
        self.backward(loss)
        grad_norm = self.sync_clip_project()
        lr = self.scheduler.get_last_lr()[0]
        self.update()
        fired_L = self.ctx.merge_fired(self.model.fired_latents(out))
        self.dead.update(fired_L, self.run.trainer.batch_size)
        return {"out": out, "terms": terms, "loss": loss.detach(), "grad_norm": grad_norm, "lr": lr}

    def renormalize_decoders(self) -> None:
        """Scale every decoder row to unit norm (SPEC section 4: the first part of a step)."""
        for w_dec in self.model.decoder_weights():
            normalize_decoder_(w_dec)

    def forward_loss(self, x_TD: torch.Tensor) -> tuple[SAEOutput, dict[str, torch.Tensor], torch.Tensor]:
        """(model output, loss terms, total loss) of this rank's tokens, under the configured autocast."""
        model = self.model
        dead_mask_L = self.dead.dead_mask() if model.k_aux > 0 else None
        with self._autocast():
            out = model(x_TD, dead_mask_L)
            terms = model.loss_terms(x_TD, out, self.ctx)
            loss = total_loss(terms, model.loss_weights(self.step / self.run.trainer.steps))
        return out, terms, loss

    def backward(self, loss: torch.Tensor) -> None:
        """This rank's gradients of `loss` (replacing the previous step's)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def sync_clip_project(self) -> torch.Tensor:
        """Reduce gradients over ranks, clip them by the true global norm, remove each decoder row's gradient
        component along the row; return the global norm before clipping."""
        self.ctx.sync_gradients(self.model)
        grad_norm = self.ctx.clip_grad_norm_(self.model, self.run.trainer.grad_clip)
        for w_dec in self.model.decoder_weights():
            remove_parallel_gradient_(w_dec)
        return grad_norm

    def update(self) -> None:
        """The Adam step and the lr schedule's step."""
        self.optimizer.step()
        self.scheduler.step()

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
