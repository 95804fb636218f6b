"""Everything `launch/train.py` does after Hydra: a run (`plan.py`: check, build the parts, train, report), or a
sweep of several SAEs on one activation stream (`multi.py`)."""

from __future__ import annotations

from typing import Any

from sae_dist.config import RunConfig
from sae_dist.parallel.context import ParallelContext
from sae_dist.train.identity import RunDirectoryError
from sae_dist.train.multi import prepare_sweep, train_sweep
from sae_dist.train.plan import RunPlan, build_trainer, finish_run, prepare_run, start_trainer, train_planned

__all__ = ["RunDirectoryError", "RunPlan", "build_trainer", "finish_run", "prepare_run", "start_trainer",
           "train_from_config", "train_planned"]


def train_from_config(
    run: RunConfig, ctx: ParallelContext | None = None, eval_batches: int = 4, overrides: list[str] | None = None
) -> dict[str, Any] | list[dict[str, Any]]:
    """Check, then train the run described by `run` (see `plan.train_planned`); for a run with a sweep (several
    SAEs on one stream, `train/multi.py`) a list of such results, one per member."""
    ctx = ctx or ParallelContext()
    if run.sweep:
        return train_sweep(prepare_sweep(run, ctx.world_size, overrides), ctx, eval_batches)
    return train_planned(prepare_run(run, ctx.world_size, overrides), ctx, eval_batches)
