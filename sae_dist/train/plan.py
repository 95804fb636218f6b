"""One run from its config to its closing table: check, build the trainer, train, report (`run.py` adds sweeps).

`prepare_run` does every check that needs neither model nor data (the output folder, inputs, device, memory,
disk, and whether and how the run continues: `identity`), on every rank, before anything is loaded. Then the
source and the trainer are built (on every rank; an error on one rank stops all of them, reported once), the
trainer trains, and the closing table is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sae_dist.config import ConfigError, RunConfig, as_dict
from sae_dist.data import build_activation_source
from sae_dist.data.cache_writer import holds_cache_files
from sae_dist.data.source import ActivationSource
from sae_dist.metrics import ReconstructionSums
from sae_dist.models.base import architecture
from sae_dist.parallel.context import ParallelContext
from sae_dist.parallel.failures import on_every_rank
from sae_dist.parallel.mesh import expert_parallel_size, validate_layout
from sae_dist.run_dir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    MODEL_FILE,
    RUN_CONFIG_FILE,
    latest_checkpoint,
    verify_files,
    write_atomically,
)
from sae_dist.train import identity, preflight
from sae_dist.train.logging import append_history
from sae_dist.train.report import print_summary
from sae_dist.train.trainer import Trainer


@dataclass(frozen=True)
class RunPlan:
    """What `prepare_run` found: the config the run uses and where and on what it runs."""

    run: RunConfig
    """The command's config, or, for a run that continues, its saved config with the allowed changes."""
    folder: preflight.OutputFolder
    device: torch.device
    d_model: int | None
    """d when known before loading (None: an 'lm' model that is not on this machine yet)."""
    continues: bool
    """Whether the folder already holds this run (a checkpoint, or its config.yaml)."""
    verified_checkpoint: Path | None = None
    """The checkpoint the run continues from, its files already checked against their SHA256SUMS."""


def prepare_run(run: RunConfig, world_size: int = 1, overrides: list[str] | None = None) -> RunPlan:
    """Every check that needs neither model nor data, in the order a user would want to hear about them.

    `overrides` are the command line's Hydra overrides (see `identity.continue_config`; None: compare every
    setting). Raises one-line ConfigErrors; writes nothing."""
    run_dir = Path(run.trainer.out_dir)
    folder = preflight.check_output_folder(run_dir, "trainer.out_dir")
    _refuse_foreign_folder(run_dir)
    saved = identity.saved_config(run_dir)
    resume_from = identity.checkpoint_to_resume(run, run_dir)
    if saved is not None:
        run, _ = identity.continue_config(saved, run, overrides)
    ep_size = validate_layout(run, world_size)
    if resume_from is not None:
        verify_files(resume_from)  # a damaged checkpoint is refused before the model and the data load
    device = preflight.check_device(run.trainer.device)
    preflight.check_inputs(run)
    preflight.check_loggers(run)
    d_model = preflight.activation_width(run)
    if d_model is not None:
        expert_shards = ep_size if architecture(run.sae.kind).routed else 1
        preflight.check_memory(run, d_model, device, expert_shards)
        kept = len(list((run_dir / "checkpoints").glob("step_*[0-9]"))) if resume_from is not None else 0
        to_write = max(1, run.trainer.keep_checkpoints + 1 - kept)
        size = preflight.checkpoint_bytes(run.sae, d_model)
        preflight.require_free_space(folder, "trainer.out_dir", to_write * size,
                                     f"{to_write} checkpoints of {preflight.format_bytes(size)}")
    return RunPlan(run, folder, device, d_model, saved is not None, resume_from)


def _refuse_foreign_folder(run_dir: Path) -> None:
    """A run's files are never mixed into a cache's (data.cache_dir was meant), a checkpoint's or a model's (the
    checkpoint's run folder was meant, which continues from its latest checkpoint, or the model is model.path)."""
    if holds_cache_files(run_dir):
        raise ConfigError(f"trainer.out_dir={run_dir} holds an activation cache; train on it with data=cache "
                          f"data.cache_dir={run_dir}, writing the run into another folder")
    if (run_dir / CONFIG_FILE).is_file() and (run_dir / MODEL_FILE).is_file():
        continues = (f"; its run continues with trainer.out_dir={run_dir.parent.parent}"
                     if run_dir.parent.name == CHECKPOINTS_DIR else "")
        raise ConfigError(f"trainer.out_dir={run_dir} is a checkpoint or a model folder ({CONFIG_FILE}, "
                          f"{MODEL_FILE}), which a run never writes into{continues}")


def _write_new_run(plan: RunPlan, world_size: int, ep_size: int) -> None:
    """config.yaml (once: a continued run's is never rewritten) and the first event of the resume history."""
    run_dir = plan.folder.path
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / RUN_CONFIG_FILE
    if not config.exists():
        write_atomically(config, OmegaConf.to_yaml(OmegaConf.create(as_dict(plan.run))).encode())
    append_history(run_dir, {"event": "start" if not plan.continues else "restart before the first checkpoint",
                             "step": 0, "tokens": 0, "world_size": world_size, "ep_size": ep_size})


def start_trainer(plan: RunPlan, ctx: ParallelContext, source: ActivationSource | None = None) -> Trainer:
    """A new run's files (rank 0), then this rank's trainer on `source` (default: the run's own source)."""
    if ctx.is_main and latest_checkpoint(plan.folder.path) is None:
        _write_new_run(plan, ctx.world_size, expert_parallel_size(plan.run, ctx.world_size))
    if source is None:
        source = build_activation_source(plan.run, ctx.rank, ctx.world_size, plan.device)
    try:
        trainer = build_trainer(plan.run, source, ctx, plan.device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc):
            raise ConfigError(f"sae.num_latents={plan.run.sae.num_latents} does not fit in {plan.device.type} memory "
                              f"({str(exc).strip().splitlines()[0]})") from None
        raise
    trainer.checkpoints.verified = plan.verified_checkpoint
    return trainer


def build_trainer(run: RunConfig, source: ActivationSource, ctx: ParallelContext, device: torch.device) -> Trainer:
    """This rank's trainer of `run` (its engine is trainer.engine's) on `source`."""
    return Trainer(run, source, ctx, device)


@torch.no_grad()
def final_evaluation(trainer: Trainer, batches: int) -> dict[str, float]:
    """Metrics over `batches` fresh batches (after the training data), for the closing table."""
    model = trainer.model
    sums = None
    for _ in range(batches):
        x_TD, y_TO = model.split_batch(trainer.next_batch())
        out = model(x_TD)
        batch = ReconstructionSums.of_batch(y_TO, out.x_hat_TD, model.active_latents(out))
        sums = batch if sums is None else sums + batch
    return ReconstructionSums.unpack(trainer.ctx.all_reduce_sum(sums.pack())).metrics()


def train_planned(plan: RunPlan, ctx: ParallelContext, eval_batches: int = 4) -> dict[str, Any]:
    """Train a prepared run; return {'last': last logged row, 'eval': final metrics, 'checkpoint', 'trainer'}."""
    if ctx.is_main:
        print(f"run folder: {plan.folder.describe()}", flush=True)
    trainer = on_every_rank(lambda: start_trainer(plan, ctx))
    try:
        trainer.train()
        return finish_run(trainer, eval_batches)
    finally:
        trainer.source.close()  # also on a stop signal or an error: see `data.prefetch.PrefetchingSource.close`


def finish_run(trainer: Trainer, eval_batches: int) -> dict[str, Any]:
    """Final metrics and the closing table of a trained run."""
    evaluation = final_evaluation(trainer, eval_batches)
    checkpoint = latest_checkpoint(trainer.run_dir)
    if trainer.ctx.is_main:
        print_summary(trainer.run, trainer.d_model, trainer.last_row, evaluation, trainer.tokens_per_s, checkpoint)
    return {"last": trainer.last_row, "eval": evaluation, "checkpoint": checkpoint, "trainer": trainer}
