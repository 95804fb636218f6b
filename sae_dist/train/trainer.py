"""The training loop (SPEC section 4): one step, logging, checkpoints and resume.

The trainer owns no distribution logic: every collective goes through the injected `ParallelContext`, which is
the identity on one device and the expert-parallel layout under torchrun.

Faults: a step whose batch, loss or gradient norm is not finite applies no update; the loop reads those flags only
at logging and checkpoint steps (no host synchronisation in between) and, before anything is written, stops with
NonFiniteError or counts the skipped steps (trainer.on_nonfinite). SIGTERM / SIGUSR1 stop the run after a
checkpoint (`preemption`). A collective that fails because another rank died or stalled ends the run with a
CollectiveError naming it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map_only
from tqdm.auto import tqdm

from sae_dist.config import RunConfig, resolve_dtype
from sae_dist.data.order import resume_state
from sae_dist.data.source import ActivationSource
from sae_dist.metrics import ReconstructionSums
from sae_dist.models import SAEOutput, architecture, build_sae
from sae_dist.models.auxk import AuxCandidates, DeadCandidates
from sae_dist.models.losses import total_loss
from sae_dist.models.router import expert_counts
from sae_dist.parallel.context import ParallelContext
from sae_dist.parallel.failures import collective_failure
from sae_dist.run_dir import CHECKPOINTS_DIR, latest_checkpoint, read_checkpoint_config
from sae_dist.train import checkpoint as ckpt
from sae_dist.train import identity
from sae_dist.train.dead import DeadLatentTracker, routed_tokens_L
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.logging import MetricsLogger, append_history
from sae_dist.train.optim import (
    build_optimizer,
    build_scheduler,
    clipped_adam_step,
    normalize_decoder_,
    optimizer_keeps_unit_rows,
    remove_parallel_gradient_,
)
from sae_dist.train.preemption import HeldSignals, StopRequested, StopSignals
from sae_dist.train.profiling import StepProfiler
from sae_dist.train.resample import resample_dead_latents, resample_due
from sae_dist.train.step_graph import StepGraphs

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteError(ValueError):
    """A step met NaN or inf under trainer.on_nonfinite=stop; the message is one line naming the step."""


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
        dispatcher = self.ctx.dispatcher(run.sae.num_experts) if architecture(run.sae.kind).routed else None
        self.model = build_sae(run.sae, self.d_model, run.trainer.seed, dispatcher).to(self.device)
        self.optimizer, self.scheduler = self.build_optimizer()
        self.dead = DeadLatentTracker(self.model.num_local_latents, run.sae.dead_tokens, self.device)
        self.run_dir = Path(run.trainer.out_dir)
        self.step = 0
        self.tokens = 0
        self.local_batch = self.ctx.local_batch_size(run.trainer.batch_size)
        self.tokens_per_s = 0.0
        """Training throughput of the last `train()` call, data production included."""
        self.resume_from: Path | None = None
        """A checkpoint to continue from instead of the one trainer.resume picks (a sweep's common step)."""
        self.last_row: dict[str, Any] = {}
        """The last logged metrics row of the last `train()` / `steps()`."""
        self._dead_candidates: DeadCandidates | None = None
        """Where AuxK looks at each step; made at the first step (after any resume), since it tracks the counters."""
        self.nonfinite_steps = 0
        """Steps skipped because of NaN or inf (trainer.on_nonfinite=skip), over the whole run."""
        self.resampled = 0
        """Dead latents resampled (sae.resample_every) over the whole run."""
        self._graphs = StepGraphs(self) if self.graphs_apply() else None
        """The step's CUDA graphs (trainer.cuda_graph), where they apply."""

    def graphs_apply(self) -> bool:
        """Whether the step replays CUDA graphs: trainer.cuda_graph on one GPU, outside torchrun (whose collectives
        read split sizes back to the host)."""
        return (self.run.trainer.cuda_graph and self.device.type == "cuda" and not self.ctx.distributed
                and self.graph_capturable)

    def build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam over every parameter and the lr schedule (an engine that owns the optimizer replaces this)."""
        optimizer = build_optimizer(self.model, self.run)
        return optimizer, build_scheduler(optimizer, self.run)

    # --- one optimisation step -------------------------------------------------------------------------------
    defer_rotation: bool = False
    """Whether `save` leaves older checkpoints for `rotate_checkpoints` (a sweep rotates once every member has saved
    a step, so that a crash between two members' saves leaves them a checkpoint in common)."""
    profiles: bool = True
    """Whether this trainer's loop runs the `trainer.profile_steps` window (one member of a sweep does: one profiler
    at a time, and its window covers every member's steps)."""
    graph_capturable: bool = True
    """Whether the step's device work may be captured as CUDA graphs (an engine with its own update sets False)."""
    weight_grads_in_place: bool = True
    """Whether the sparse kernels add their weight gradients straight into `.grad` (see `backward`); an engine
    that hooks gradient accumulation (DeepSpeed) sets it False to get them through autograd."""

    def train_step(self, x_TD: torch.Tensor) -> dict[str, Any]:
        """Forward, backward, sync, clip, project decoder gradients, Adam, renormalise decoders (and, at the steps
        of sae.resample_every, resample dead latents: `resample_dead`).

        The decoder rows are renormalised after each update (the start state is unit norm), which is the spec's
        renormalise-then-forward order shifted by half a step, so a skipped step changes nothing. Returns 'out',
        'terms', 'loss', 'grad_norm', 'lr' and 'finite': a 0-dim bool on the device, False when the batch, the loss
        or the gradient norm was not finite; then no update was applied at all (parameters, Adam moments and
        steps, dead-latent counters). Nothing is read back to the host on one device. On one GPU the device work
        before and after the update replays as CUDA graphs (`step_graph.py`); then 'out', 'terms', 'loss' and
        'grad_norm' are valid until the next step.
        """
        aux = self._aux_candidates()
        weights = self.model.loss_weights(self.step / self.run.trainer.steps)
        graphs = self._graphs
        from_graphs = graphs is not None and graphs.ready(x_TD, aux, weights)
        result = graphs.before_update(x_TD, aux, weights) if from_graphs else None  # None: run it eagerly
        if result is not None:
            result["lr"] = self.update(result["grad_norm"], result["finite"])
            if not graphs.after_update():
                self.after_update(result)
            result["finite"] = result["finite"].clone()  # the loop keeps it past the next replay
        else:
            result = self.before_update(x_TD, aux, weights)
            result["lr"] = self.update(result["grad_norm"], result["finite"])
            self.after_update(result)
        if self._dead_candidates is not None:
            self._dead_candidates.after_update(self.dead.tokens_since_fired_L)
        self.resample_dead(x_TD, result["out"], result["finite"])
        return result

    def before_update(self, x_TD: torch.Tensor, aux: AuxCandidates | None, weights: dict[str, float]
                      ) -> dict[str, Any]:
        """The step up to the update: 'out', 'terms', 'loss', 'grad_norm' and 'finite' (see `train_step`)."""
        out, terms, loss = self.forward_loss(x_TD, aux, weights)
        self.backward(loss)
        grad_norm = self.sync_clip_project()
        # A non-finite batch makes L_rec (a sum over all of it) and the global gradient norm non-finite: checking
        # the two scalars covers it without a pass over the batch.
        finite = torch.isfinite(torch.stack([loss.detach().float(), grad_norm.float()])).all()
        # Detached: a result that outlives the step must not keep its autograd graph alive. That graph holds the
        # parameters' gradient accumulators, which then keep the stream they were made on; the next step's
        # backward on another stream (a CUDA graph's capture) would have to wait for it.
        out, terms = tree_map_only(torch.Tensor, torch.Tensor.detach, (out, terms))
        return {"out": out, "terms": terms, "loss": loss.detach(), "grad_norm": grad_norm, "finite": finite}

    def after_update(self, result: dict[str, Any]) -> None:
        """The step's device work after the update: decoder renormalisation, dead-latent counters, model state."""
        self.renormalize_decoders(result["finite"])
        self.track_dead_latents(result["out"], result["finite"])
        self.model.after_step(result["out"], self.ctx, result["finite"])

    def forward_loss(
        self, x_TD: torch.Tensor, aux: AuxCandidates | None = None, weights: dict[str, float] | None = None
    ) -> tuple[SAEOutput, dict[str, torch.Tensor], torch.Tensor]:
        """(model output, loss terms, total loss) of this rank's tokens, under the configured autocast; AuxK (when
        on) over `aux`, this step's dead-latent candidates; `weights` default to the model's at this step."""
        model = self.model
        if weights is None:
            weights = model.loss_weights(self.step / self.run.trainer.steps)
        with self._autocast(), model.in_place_weight_grads(self.weight_grads_in_place):
            out = model(x_TD) if aux is None else model(x_TD, aux_candidates=aux)
            terms = model.loss_terms(x_TD, out, self.ctx)
            loss = total_loss(terms, weights)
        return out, terms, loss

    def backward(self, loss: torch.Tensor) -> None:
        """This rank's gradients of `loss` into `.grad` (replacing the previous step's).

        The gradients are set to None first, which spares a zeroing pass and autograd's accumulation: the sparse
        kernels then overwrite their weights' buffers of the previous steps (`kernels._weight_grad`; a fresh
        [M, d] tensor would cost a CPU more in page faults than the backward that fills it), and autograd hands
        over the other gradients as it makes them.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def sync_clip_project(self) -> torch.Tensor:
        """Reduce gradients over ranks, remove each decoder row's gradient component along the row (unless the
        optimizer does it in its update); return the global norm of the unprojected gradients, which `update` clips
        by (the optimizer scales the gradients in its own pass)."""
        self.ctx.sync_gradients(self.model)
        grad_norm = self.ctx.grad_norm(self.model)
        # Clipping scales every gradient alike, so projecting before Adam applies the clip factor is the same.
        for w_dec in self.model.decoder_weights():
            if not optimizer_keeps_unit_rows(self.optimizer, w_dec):
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
        """Scale every decoder row to unit norm (not where `apply`, a 0-dim bool, is False), except those of the
        weights the optimizer renormalises in its update."""
        for w_dec in self.model.decoder_weights():
            if not optimizer_keeps_unit_rows(self.optimizer, w_dec):
                normalize_decoder_(w_dec, apply)

    def track_dead_latents(self, out: SAEOutput, finite: torch.Tensor) -> None:
        """Advance the dead-latent counters (not after a skipped step)."""
        fired_L = self.ctx.merge_fired(self.model.fired_latents(out))
        self.dead.update(fired_L, self._counted_tokens(out), finite)

    def resample_dead(self, x_TD: torch.Tensor, out: SAEOutput, finite: torch.Tensor) -> None:
        """At a step of sae.resample_every (this one being step `self.step + 1`) whose update was applied, resample
        the dead latents from this step's batch (`resample.py`; reads `finite` back to the host then only)."""
        step = self.step + 1
        if not resample_due(self.run, step) or not bool(finite):
            return
        self.resampled += resample_dead_latents(
            self.model, self.optimizer, self.dead, self.ctx, x_TD, out, self.run.trainer.seed, step
        )
        if self._graphs is not None:
            self._graphs.reset()

    def _counted_tokens(self, out: SAEOutput) -> int | torch.Tensor:
        """What this step adds to the dead-latent counters (`sae.dead_count`): the global batch size, or per local
        latent the global batch's tokens routed to its expert."""
        if self.run.sae.dead_count == "tokens":
            return self.run.trainer.batch_size
        experts = self.model.experts
        return routed_tokens_L(out.routing, out.kept_T, experts.first_expert, experts.num_local,
                               self.model.latents_per_expert, self.ctx.all_reduce_sum)

    def _aux_candidates(self) -> AuxCandidates | None:
        """AuxK's candidate latents for this step; None when AuxK is off or no latent can be dead yet."""
        if not self.model.k_aux:
            return None
        if self._dead_candidates is None:
            self._dead_candidates = DeadCandidates(
                self.model.num_local_experts, self.run.sae.dead_tokens, self.run.trainer.batch_size, self.tokens,
                round_width=self._graphs is not None,
            )
        return self._dead_candidates.for_step(self.dead.tokens_since_fired_L)

    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(resolve_dtype(self.run.trainer.dtype, self.device.type))
        # No cast cache under graphs: cached casts would outlive the capture's autocast region.
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None,
                              cache_enabled=self._graphs is None)

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
        if self.run.sae.resample_every is not None:
            row["resampled"] = self.resampled
        if out.routing is not None:
            row.update(self._routing_metrics(out))
        row["grad_norm"] = float(result["grad_norm"])
        row["lr"] = result["lr"]
        return row

    def _routing_metrics(self, out: SAEOutput) -> dict[str, Any]:
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

    # --- checkpoints -----------------------------------------------------------------------------------------
    def _tensors(self) -> ckpt.TrainingTensors:
        return ckpt.TrainingTensors(self.model, self.optimizer, self.dead.tokens_since_fired_L)

    def save(self) -> Path:
        """Write a checkpoint (collectively: every rank calls this); older ones are rotated away at once unless
        `defer_rotation`."""
        run_state = {"step": self.step, "tokens": self.tokens, "scheduler": self.scheduler.state_dict(),
                     "nonfinite_steps": self.nonfinite_steps, "resampled": self.resampled}
        rank_state = {"data": self.source.state_dict(), "torch_rng": torch.get_rng_state()}
        return ckpt.save_checkpoint(self.run_dir, self.run, self.d_model, self.step, self._tensors(), run_state,
                                    rank_state, self.ctx, rotate=not self.defer_rotation)

    def checkpoint_due(self) -> bool:
        """Whether the loop checkpoints the step just taken (every `trainer.checkpoint_every`, and the last)."""
        return self.step % self.run.trainer.checkpoint_every == 0 or self.step == self.run.trainer.steps

    def rotate_checkpoints(self) -> None:
        """Keep only the newest `trainer.keep_checkpoints` checkpoints (rank 0 deletes the others)."""
        if self.ctx.is_main:
            ckpt.rotate_checkpoints(self.run_dir / CHECKPOINTS_DIR, self.run.trainer.keep_checkpoints, self.step)

    def restore(self, folder: Path) -> None:
        """Continue from a checkpoint written on any layout (see `checkpoint` for the data-position rule)."""
        run_state, rank_states = ckpt.load_checkpoint(folder, self._tensors(), self.ctx)
        self.step, self.tokens = run_state["step"], run_state["tokens"]
        self._dead_candidates = None  # its bookkeeping described the counters before the restore
        if self._graphs is not None:
            self._graphs.reset()
        self.nonfinite_steps = run_state.get("nonfinite_steps", 0)
        self.resampled = run_state.get("resampled", 0)
        self.scheduler.load_state_dict(run_state["scheduler"])
        data_states = [state["data"] for state in rank_states]
        self.source.load_state_dict(resume_state(data_states, self.ctx.rank, self.ctx.world_size))
        torch.set_rng_state(rank_states[self.ctx.rank % len(rank_states)]["torch_rng"])

    def maybe_resume(self) -> bool:
        """Continue from `resume_from`, else from the run's latest checkpoint as trainer.resume says; return whether
        one was found.

        The checkpoint's config must define the same run (`identity`); the changes allowed on resume are recorded
        in the run's resume history with the line 'resumed from step N (tokens T) on W ranks', also printed."""
        folder = self.resume_from or identity.checkpoint_to_resume(self.run, self.run_dir)
        if folder is None:
            return False
        saved, _, _ = read_checkpoint_config(folder)
        _, changes = identity.continue_config(saved, self.run)
        self.restore(folder)
        world = self.ctx.world_size
        message = f"resumed from step {self.step} (tokens {self.tokens:,}) on {world} rank{'s' if world > 1 else ''}"
        if self.ctx.is_main:
            print(message, flush=True)
            append_history(self.run_dir, {
                "event": "resume", "message": message, "checkpoint": folder.name, "step": self.step,
                "tokens": self.tokens, "world_size": world, "ep_size": world // self.ctx.expert_replicas,
                "changes": changes,
            })
        return True

    # --- the loop --------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to `trainer.steps`; return the last logged metrics row.

        Raises NonFiniteError (trainer.on_nonfinite=stop), StopRequested (SIGTERM or SIGUSR1: after writing a
        checkpoint) and CollectiveError (another rank died or stalled)."""
        for _ in self.steps():
            pass
        return self.last_row

    def steps(self, signals: HeldSignals | None = None) -> Iterator[int]:
        """The loop of `train`, yielding the step count once after resuming and then after every step (the SAEs of
        a sweep, fed by one stream, all resume first and then advance in turn: `train/multi.py`); the last logged
        row is then in `last_row`. `signals`: the sweep's stop signals (None: the loop records its own)."""
        cfg = self.run.trainer
        if self.ctx.is_main:
            ckpt.remove_partial_checkpoints(self.run_dir)
        self.ctx.barrier()
        self.maybe_resume()
        logger = MetricsLogger(self.run_dir, self.step, cfg.tensorboard) if self.ctx.is_main else None
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.ctx.is_main), unit="step"
        )
        last_row: dict[str, Any] = {}
        window_start, window_tokens = time.perf_counter(), 0
        session_start, session_start_tokens = window_start, self.tokens
        unchecked: list[tuple[int, torch.Tensor]] = []  # (step, finite flag on the device) since the last read
        doing = f"step {self.step + 1}"  # for the error message of a failed collective
        profiler = self._step_profiler()
        try:
            profiler.after_step(self.step)
            yield self.step
            with StopSignals() if signals is None else nullcontext(signals) as signals:
                while self.step < cfg.steps:
                    doing = f"step {self.step + 1}"
                    x_TD = self.source.next_batch(self.local_batch).to(self.device, non_blocking=True)
                    if self.step == 0:
                        self._init_biases(x_TD)
                    result = self.train_step(x_TD)
                    self.step += 1
                    self.tokens += cfg.batch_size
                    window_tokens += cfg.batch_size
                    unchecked.append((self.step, result["finite"]))
                    bar.update(1)
                    at_log = self.step % cfg.log_every == 0 or self.step == cfg.steps
                    at_checkpoint = self.checkpoint_due()
                    stop = self._stop_requested(signals, at_log or at_checkpoint)
                    if at_log or at_checkpoint or stop:
                        self._check_finite(unchecked)
                    if at_log:
                        doing = f"the metrics of step {self.step}"
                        now = time.perf_counter()
                        last_row = self._log(x_TD, result, window_tokens / max(now - window_start, 1e-9), logger, bar)
                        window_start, window_tokens = now, 0
                    if at_checkpoint or stop:
                        doing = f"the checkpoint of step {self.step}"
                        checkpoint = self.save()
                    if stop:
                        raise StopRequested(stop, self.step, checkpoint)
                    profiler.after_step(self.step)
                    yield self.step
        except RuntimeError as exc:
            failure = collective_failure(exc, self.ctx.rank, self.run.parallel.timeout_s, doing)
            if failure is None:
                raise
            raise failure from exc
        finally:
            profiler.close()
            bar.close()
            if logger is not None:
                logger.close()
        self.tokens_per_s = (self.tokens - session_start_tokens) / max(time.perf_counter() - session_start, 1e-9)
        self.last_row = last_row

    def _step_profiler(self) -> StepProfiler:
        """The window of `trainer.profile_steps` steps after this session's first metrics window (none when 0)."""
        cfg = self.run.trainer
        steps = cfg.profile_steps if self.profiles else 0
        first = min(self.step + cfg.log_every, max(cfg.steps - steps, self.step))
        last = min(first + steps, cfg.steps)
        return StepProfiler(first, last, self.run_dir, self.ctx.rank, self.device, show=self.ctx.is_main)

    def _log(
        self, x_TD: torch.Tensor, result: dict[str, Any], tokens_per_s: float, logger: MetricsLogger | None, bar: tqdm
    ) -> dict[str, Any]:
        """The metrics row of this step: computed on every rank, shown and written by rank 0."""
        row = self.step_metrics(x_TD, result)
        row["nonfinite_steps"] = self.nonfinite_steps
        row["tokens_per_s"] = tokens_per_s
        bar.set_postfix(loss=f"{row['loss']:.4g}", mse=f"{row['mse']:.4g}", tok_s=f"{row['tokens_per_s']:.3g}")
        if logger is not None:
            logger.log(row)
        return row

    def _init_biases(self, x_TD: torch.Tensor) -> None:
        """b_pre and b_router from the first global batch's finite rows (none finite: left as built, and the step
        is non-finite anyway)."""
        rows_TD = self.ctx.gather_rows(x_TD)
        rows_TD = rows_TD[torch.isfinite(rows_TD).all(dim=1)]
        if rows_TD.shape[0]:
            init_biases_from_batch(self.model, rows_TD)

    def _stop_requested(self, signals: StopSignals | HeldSignals, at_sync_point: bool) -> str | None:
        """The stop signal to honour after this step, if any: in one process as soon as it arrives; under torchrun
        at logging and checkpoint steps, when the ranks agree (one small all-reduce), so all stop together."""
        if not self.ctx.distributed:
            return signals.received
        if not at_sync_point:
            return None
        flag = torch.tensor([0.0 if signals.received is None else 1.0], device=self.device)
        if float(self.ctx.all_reduce_sum(flag).sum()) == 0:
            return None
        return signals.received or "a stop signal to another rank"

    def _check_finite(self, unchecked: list[tuple[int, torch.Tensor]]) -> None:
        """Read the finite flags of the steps since the last check (one transfer): raise NonFiniteError under
        trainer.on_nonfinite=stop, else count the skipped steps. Every rank holds the same flags."""
        if not unchecked:
            return
        flags = torch.stack([flag for _, flag in unchecked]).tolist()
        bad = [step for (step, _), ok in zip(unchecked, flags, strict=True) if not ok]
        unchecked.clear()
        if not bad:
            return
        if self.run.trainer.on_nonfinite == "stop":
            latest = latest_checkpoint(self.run_dir)
            kept = f"the last checkpoint is {latest.name}" if latest is not None else "no checkpoint was written"
            raise NonFiniteError(
                f"step {bad[0]}: NaN or inf in the batch, the loss or the gradient norm (no update applied); "
                f"stopped at step {self.step} without writing a checkpoint ({kept}); check the activations, or "
                "pass trainer.on_nonfinite=skip to skip such steps"
            )
        self.nonfinite_steps += len(bad)
        if self.ctx.is_main:
            tqdm.write(f"warning: skipped {len(bad)} step(s) with NaN or inf (first: step {bad[0]}); "
                       f"{self.nonfinite_steps} skipped in this run")
