"""Everything `launch/train.py` does after Hydra: validate, build the parts, train, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sae_dist.config import RunConfig, as_dict
from sae_dist.data import build_activation_source
from sae_dist.data.source import ActivationSource
from sae_dist.eval.metrics import ReconstructionSums
from sae_dist.parallel.context import ParallelContext
from sae_dist.train.checkpoint import latest_checkpoint
from sae_dist.train.report import print_summary
from sae_dist.train.trainer import Trainer


class RunDirectoryError(FileExistsError):
    """The output folder already holds a run that this one would overwrite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device='cuda' but no CUDA device is available; use trainer.device=cpu or auto")
    return torch.device(name)


def check_run_dir(run: RunConfig) -> Path:
    """Refuse to train over an existing run unless resuming it: nothing already written is lost."""
    run_dir = Path(run.trainer.out_dir)
    if latest_checkpoint(run_dir) is not None and not run.trainer.resume:
        raise RunDirectoryError(
            f"trainer.out_dir={str(run_dir)!r} already holds checkpoints; "
            "pass trainer.resume=true to continue it or choose another trainer.out_dir"
        )
    return run_dir


def build_trainer(run: RunConfig, source: ActivationSource, ctx: ParallelContext, device: torch.device) -> Trainer:
    """The trainer of `trainer.engine`: the torch engine, or DeepSpeed's (imported only when asked for)."""
    if run.trainer.engine == "deepspeed":
        from sae_dist.train.deepspeed_engine import DeepSpeedTrainer

        return DeepSpeedTrainer(run, source, ctx, device)
    return Trainer(run, source, ctx, device)


@torch.no_grad()
def final_evaluation(trainer: Trainer, batches: int) -> dict[str, float]:
    """Metrics over `batches` fresh batches (after the training data), for the closing table."""
    model = trainer.model
    sums = None
    for _ in range(batches):
        x_TD = trainer.source.next_batch(trainer.local_batch).to(trainer.device)
        out = model(x_TD)
        batch = ReconstructionSums.of_batch(x_TD, out.x_hat_TD, model.active_latents(out))
        sums = batch if sums is None else sums + batch
    return ReconstructionSums.unpack(trainer.ctx.all_reduce_sum(sums.pack())).metrics()


def train_from_config(run: RunConfig, ctx: ParallelContext | None = None, eval_batches: int = 4) -> dict[str, Any]:
    """Train the run described by `run`; return {'last': last logged row, 'eval': final metrics, 'checkpoint'}."""
    ctx = ctx or ParallelContext()
    run_dir = check_run_dir(run)
    device = resolve_device(run.trainer.device)
    source = build_activation_source(run, ctx.rank, ctx.world_size, device)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict(run))))
    trainer = build_trainer(run, source, ctx, device)
    last = trainer.train()
    evaluation = final_evaluation(trainer, eval_batches)
    checkpoint = latest_checkpoint(run_dir)
    if ctx.is_main:
        print_summary(run, trainer.d_model, last, evaluation, trainer.tokens_per_s, checkpoint)
    return {"last": last, "eval": evaluation, "checkpoint": checkpoint, "trainer": trainer}
