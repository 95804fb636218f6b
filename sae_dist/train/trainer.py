"""The training loop (docs/math.md section 4): the parts of a run wired together, then steps, logs and checkpoints at
their cadence until `trainer.steps`.

The parts, one concern each: the engine (`engine.py`, `deepspeed_engine.py`), the step (`step.py`), the latent
bookkeeping (`latents.py`), metrics rows (`step_metrics.py`), the training state and its checkpoints
(`train_state.py`), the input scales of normalised activations (`input_scale.py`). The trainer owns no distribution
logic: every collective goes through the injected `ParallelContext`, which is the identity on one device and the
expert-parallel layout under torchrun.

Faults: a step that is not finite applies no update, and the loop applies trainer.on_nonfinite at logging and
checkpoint steps (`nonfinite.py`); under skip, a run that applies no update for 100 steps in a row, or at all up to
its last step, stops with NoUpdateError, and weights that no step has updated are never checkpointed. SIGTERM /
SIGUSR1 stop the run after a checkpoint, none of untouched weights (`preemption`). A collective that fails because
another rank died or stalled ends the run with a CollectiveError naming it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_dist.config import RunConfig
from sae_dist.data.source import ActivationSource
from sae_dist.models.base import input_width
from sae_dist.parallel.context import ParallelContext
from sae_dist.parallel.failures import collective_failure
from sae_dist.train.init import init_biases_from_batch
from sae_dist.train.input_scale import estimate_input_scales, scale_rows
from sae_dist.train.logging import MetricsLogger
from sae_dist.train.nonfinite import FiniteFlags, NonFiniteError
from sae_dist.train.preemption import HeldSignals, StopRequested, StopSignals, agreed_stop
from sae_dist.train.profiling import StepProfiler
from sae_dist.train.step import StepResult, build_step
from sae_dist.train.step_metrics import StepMetrics
from sae_dist.train.train_state import CheckpointManager, TrainState

__all__ = ["NonFiniteError", "Trainer"]


class Trainer:
    """Trains one SAE on batches from an activation source. Its parts: `stepper` (the step, with the model, engine
    and latent bookkeeping), `metrics`, `state` and `checkpoints`; the methods below the loop delegate to them."""

    def __init__(self, run: RunConfig, source: ActivationSource, ctx: ParallelContext | None = None,
                 device: torch.device | str = "cpu"):
        self.run, self.source, self.ctx, self.device = run, source, ctx or ParallelContext(), torch.device(device)
        self.d_model, ctx = input_width(run.sae, source.d_model), self.ctx
        self.stepper = build_step(run, self.d_model, ctx, self.device)
        self.model, self.engine, self.latents = self.stepper.model, self.stepper.engine, self.stepper.latents
        self.metrics = StepMetrics(self.model, self.latents, ctx, run)
        self.state = TrainState(self.model, self.engine, self.latents, source)
        self.checkpoints = CheckpointManager(self.state, run, self.d_model, ctx)
        self.run_dir = Path(run.trainer.out_dir)
        self.local_batch = ctx.local_batch_size(run.trainer.batch_size)
        self.resume_from: Path | None = None
        """A checkpoint to continue from instead of the one trainer.resume picks (a sweep's common step)."""
        self.defer_rotation = False
        """Whether `save` leaves older checkpoints for `rotate_checkpoints` (a sweep rotates once every member has
        saved a step, so that a crash between two members' saves leaves them a checkpoint in common)."""
        self.profiles = True
        """Whether this loop runs the `trainer.profile_steps` window (one member of a sweep does: one profiler at a
        time, and its window covers every member's steps)."""
        self.last_row: dict[str, Any] = {}
        """The last logged metrics row of the last `train()` / `steps()`."""
        self.tokens_per_s = 0.0
        """Training throughput of the last `train()` call, data production included."""

    # --- the parts' state, as the loop's callers read it -------------------------------------------------------
    step = property(lambda self: self.state.step, lambda self, value: setattr(self.state, "step", value))
    tokens = property(lambda self: self.state.tokens, lambda self, value: setattr(self.state, "tokens", value))
    nonfinite_steps = property(lambda self: self.state.nonfinite_steps)
    resampled = property(lambda self: self.latents.resampled)
    dead = property(lambda self: self.latents.dead)
    optimizer = property(lambda self: self.engine.optimizer)
    scheduler = property(lambda self: self.engine.scheduler)

    def train_step(self, x_TD: torch.Tensor) -> StepResult:
        """One step on this rank's batch (`step.TrainStep`); the counters advance in the loop."""
        return self.stepper(x_TD, self.state.step, self.state.tokens)

    def step_metrics(self, x_TD: torch.Tensor, result: StepResult) -> dict[str, Any]:
        """The global metrics row of the step just taken (collective)."""
        return self.metrics.row(x_TD, result, self.state.step, self.state.tokens)

    def next_batch(self) -> torch.Tensor:
        """This rank's next batch on the device, its x times s_x and a transcoder's y times s_y where activations
        are normalised (`input_scale.scale_rows`)."""
        x_TD = self.source.next_batch(self.local_batch).to(self.device, non_blocking=True)
        state = self.state
        return x_TD if state.input_scale is None else scale_rows(x_TD, self.d_model, state.input_scale,
                                                                 state.target_scale)

    def save(self) -> Path:
        return self.checkpoints.save(rotate=not self.defer_rotation)

    def checkpoint_due(self) -> bool:
        return self.checkpoints.due()

    def rotate_checkpoints(self) -> None:
        self.checkpoints.rotate()

    def restore(self, folder: Path) -> None:
        self.checkpoints.restore(folder)
        self.stepper.reset()

    def maybe_resume(self) -> bool:
        """Continue from `resume_from`, else as trainer.resume says (`CheckpointManager.resume`)."""
        if self.checkpoints.resume(self.resume_from) is None:
            return False
        self.stepper.reset()
        return True

    # --- the loop --------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to `trainer.steps`; return the last logged metrics row.

        Raises NonFiniteError (trainer.on_nonfinite=stop), NoUpdateError (trainer.on_nonfinite=skip: 100 steps in a
        row, or every step of a run that reaches its end, skipped), StopRequested (SIGTERM or SIGUSR1: after writing
        a checkpoint, none while every step so far was skipped) and CollectiveError (another rank died or
        stalled)."""
        for _ in self.steps():
            pass
        return self.last_row

    def steps(self, signals: HeldSignals | None = None) -> Iterator[int]:
        """The loop of `train`, yielding the step count once after resuming and then after every step (the SAEs of
        a sweep, fed by one stream, all resume first and then advance in turn: `train/multi.py`); the last logged
        row is then in `last_row`. `signals`: the sweep's stop signals (None: the loop records its own)."""
        cfg, ctx, state = self.run.trainer, self.ctx, self.state
        self.checkpoints.remove_partial()
        self.maybe_resume()
        if self.run.data.normalize_activations != "none" and state.input_scale is None:
            self._estimate_input_scales()
        logger = None
        if ctx.is_main:
            logger = MetricsLogger(self.run_dir, state.step, cfg.tensorboard, self.run if cfg.wandb else None)
        bar = tqdm(total=cfg.steps, initial=state.step, disable=not (cfg.progress and ctx.is_main), unit="step")
        flags = FiniteFlags(cfg.on_nonfinite, self.run_dir, show=ctx.is_main)
        last_row: dict[str, Any] = {}
        window_start, window_tokens = time.perf_counter(), 0
        session_start, session_start_tokens = window_start, state.tokens
        doing = f"step {state.step + 1}"  # for the error message of a failed collective
        profiler = self._step_profiler()
        try:
            profiler.after_step(state.step)
            yield state.step
            with StopSignals() if signals is None else nullcontext(signals) as signals:
                while state.step < cfg.steps:
                    doing = f"step {state.step + 1}"
                    x_TD = self.next_batch()
                    if state.step == 0:
                        self._init_biases(x_TD)
                    result = self.train_step(x_TD)
                    state.step += 1
                    state.tokens += cfg.batch_size
                    window_tokens += cfg.batch_size
                    flags.add(state.step, result.finite)
                    bar.update(1)
                    at_log = state.step % cfg.log_every == 0 or state.step == cfg.steps
                    at_checkpoint = self.checkpoint_due()
                    stop = agreed_stop(signals, ctx, self.device, at_log or at_checkpoint)
                    if at_log or at_checkpoint or stop:
                        state.nonfinite_steps, state.skipped_since = flags.check(
                            state.step, state.nonfinite_steps, state.skipped_since, last=state.step == cfg.steps)
                    if at_log:
                        doing = f"the metrics of step {state.step}"
                        now = time.perf_counter()
                        last_row = self._log(x_TD, result, window_tokens / max(now - window_start, 1e-9), logger, bar)
                        window_start, window_tokens = now, 0
                    checkpoint = None
                    if (at_checkpoint or stop) and not self._untouched(state.step):
                        doing = f"the checkpoint of step {state.step}"
                        checkpoint = self.save()
                    if stop:
                        raise self._stop_requested(stop, checkpoint)
                    profiler.after_step(state.step)
                    yield state.step
        except RuntimeError as exc:
            failure = collective_failure(exc, ctx.rank, self.run.parallel.timeout_s, doing)
            if failure is None:
                raise
            raise failure from exc
        finally:
            profiler.close()
            bar.close()
            if logger is not None:
                logger.close()
        self.tokens_per_s = (state.tokens - session_start_tokens) / max(time.perf_counter() - session_start, 1e-9)
        self.last_row = last_row

    def _stop_requested(self, signal_name: str, checkpoint: Path | None) -> StopRequested:
        """The stop after this step: preempted, the run is requeued whatever it has applied, so a run whose every
        step so far was skipped stops too, with no checkpoint (its requeued job starts again from step 0)."""
        if checkpoint is not None:
            return StopRequested(signal_name, self.state.step, checkpoint)
        return StopRequested(signal_name, self.state.step, None, "no checkpoint written: every step so far was "
                             "skipped for NaN or inf, no update applied", self.run_dir)

    def _untouched(self, step: int) -> bool:
        """Whether no step up to `step` applied an update: weights as initialised are not checkpointed (a run that
        ends so fails, `nonfinite.NoUpdateError`)."""
        if self.state.skipped_since != 1:
            return False
        if self.ctx.is_main:
            tqdm.write(f"warning: checkpoint of step {step} not written: every step so far was skipped")
        return True

    def _step_profiler(self) -> StepProfiler:
        """The window of `trainer.profile_steps` steps after this session's first metrics window (none when 0)."""
        cfg, step = self.run.trainer, self.state.step
        steps = cfg.profile_steps if self.profiles else 0
        first = min(step + cfg.log_every, max(cfg.steps - steps, step))
        last = min(first + steps, cfg.steps)
        return StepProfiler(first, last, self.run_dir, self.ctx.rank, self.device, show=self.ctx.is_main)

    def _log(self, x_TD: torch.Tensor, result: StepResult, tokens_per_s: float, logger: MetricsLogger | None,
             bar: tqdm) -> dict[str, Any]:
        """The metrics row of this step: computed on every rank, shown and written by rank 0."""
        row = self.step_metrics(x_TD, result)
        row["nonfinite_steps"] = self.state.nonfinite_steps
        row["tokens_per_s"] = tokens_per_s
        bar.set_postfix(loss=f"{row['loss']:.4g}", mse=f"{row['mse']:.4g}", tok_s=f"{row['tokens_per_s']:.3g}")
        if logger is not None:
            logger.log(row)
        return row

    def _estimate_input_scales(self) -> None:
        """s (a transcoder's s_x and s_y) from the stream's first batches, the same on every rank (`input_scale`)."""
        state = self.state
        state.input_scale, state.target_scale = estimate_input_scales(self.source, self.local_batch, self.ctx,
                                                                      self.device, self.d_model)
        if self.ctx.is_main:
            scaled = (f"activations scaled by s = {state.input_scale:.6g}" if state.target_scale is None else
                      f"inputs x scaled by s_x = {state.input_scale:.6g}, targets y by s_y = {state.target_scale:.6g}")
            print(f"{scaled} (data.normalize_activations={self.run.data.normalize_activations})", flush=True)

    def _init_biases(self, x_TD: torch.Tensor) -> None:
        """b_pre and b_router from the first global batch's finite rows (none finite: left as built, and the step
        is non-finite anyway)."""
        rows_TD = self.ctx.gather_rows(x_TD)
        rows_TD = rows_TD[torch.isfinite(rows_TD).all(dim=1)]
        if rows_TD.shape[0]:
            init_biases_from_batch(self.model, rows_TD)
