"""What the training and caching commands hold and check around their work, beyond the config's own checks.

`hold_folder`: the folder's lock (`run_lock`), taken by rank 0 alone under torch.distributed, every rank told the
outcome before any of them loads anything. `check_resumed_width`: a run that continues reads activations of the
width its checkpoint was trained on (a cache folder replaced by one of another model, a model of another width),
told from the checkpoint's config.json before any weight is read. `watch_launcher`: a torchrun worker stops when
its agent is gone (`parent_watch`). `interrupted`: what Ctrl-C leaves of a run, for its one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sae_dist.cli import Interrupted
from sae_dist.config import RunConfig, resume_mode
from sae_dist.launcher_env import under_torchrun
from sae_dist.parallel.failures import on_every_rank
from sae_dist.parent_watch import watch_parent
from sae_dist.run_dir import CheckpointError, latest_checkpoint, read_checkpoint_config
from sae_dist.run_lock import FolderLock
from sae_dist.train import identity, preflight
from sae_dist.train.preemption import out_dir_override, request_stop
from sae_dist.train.preflight import check_output_folder

WATCH_GRACE_MARGIN_S = 60.0
"""Seconds an orphaned worker may take, beyond the collective timeout, to checkpoint and stop."""


@contextmanager
def hold_folder(folder: str | os.PathLike, option: str) -> Iterator[None]:
    """Hold `folder`'s lock for the block (rank 0 under torch.distributed); a folder in use is a one-line
    FolderInUseError on every rank (printed once), before the block runs. The folder is checked writable first."""
    import torch.distributed as dist


    holder = not dist.is_initialized() or dist.get_rank() == 0
    lock = FolderLock(folder, option)

    def take() -> None:
        if holder:
            check_output_folder(Path(folder), option)
            lock.acquire()

    on_every_rank(take)
    try:
        yield
    finally:
        if holder:
            lock.release()


def _source_of(run: RunConfig) -> str:
    data = run.data
    if data.source == "cache":
        return f"data.cache_dir={data.cache_dir}"
    if data.source == "synthetic":
        return "data.d_model"
    return f"model {run.model.path or run.model.name} block {run.model.layer}"


def check_resumed_width(run: RunConfig, overrides: list[str] | None) -> None:
    """Each run (each sweep member) that continues from a checkpoint gets activations of the checkpoint's d_model;
    else a one-line CheckpointError naming both widths and where the activations come from."""

    for member in preflight.expanded_sweep_members(run) if run.sweep else [run]:
        if resume_mode(member.trainer) == "false":
            continue  # the run refuses the folder's checkpoints anyway (`identity.checkpoint_to_resume`)
        latest = latest_checkpoint(member.trainer.out_dir)
        if latest is None:
            continue
        saved, saved_width, _ = read_checkpoint_config(latest)
        continued, _ = identity.continue_config(saved, member, overrides)
        width = preflight.activation_width(continued)
        if width is not None and width != saved_width:
            raise CheckpointError(
                f"{latest} was trained on activations of d_model={saved_width}, but {_source_of(continued)} gives "
                f"d_model={width}: continue it on the data it was trained on, or choose another trainer.out_dir"
            )


def interrupted(run: RunConfig) -> Interrupted:
    """What Ctrl-C leaves of `run` (a sweep: of each of its SAEs) and the command that goes on from there."""
    override = out_dir_override(run.trainer.out_dir)
    if run.sweep:
        return Interrupted(f"each SAE of the sweep keeps its checkpoints; the same command with {override} "
                           "continues each from its latest")
    latest = latest_checkpoint(run.trainer.out_dir)
    if latest is None:
        return Interrupted(f"the run has no checkpoint yet; the same command with {override} starts it again")
    return Interrupted(f"the steps after the run's latest checkpoint, {latest}, are lost; the same command with "
                       f"{override} continues the run from it")


def watch_launcher(run: RunConfig) -> None:
    """Under torchrun, stop this worker when its agent is gone (after a checkpoint, within the collective
    timeout plus `WATCH_GRACE_MARGIN_S`)."""
    if under_torchrun():
        watch_parent(request_stop, grace_s=run.parallel.timeout_s + WATCH_GRACE_MARGIN_S)
