"""Several SAEs from one LM pass: `run.sweep` trains SAEs of other sizes, k or hook sites on one activation stream.

The language model runs once over the text, reading every hooked block in the same forward (rows hold the sites
side by side); a `SharedStream` hands each batch to every member, cut to its site. Each member is an ordinary
`Trainer` with its own run folder (trainer.out_dir/<name>: config, metrics, checkpoints), and the members step
in turn, so member i's batch j is the batch j that a run of member i alone would see: a sweep equals its members
trained separately on the same stream (tested), at the price of one LM pass.

Resume: the members restore the newest checkpoint step that all of them have (a crash between two members'
saves leaves one a checkpoint ahead), so the shared stream continues from one position.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from sae_dist.config import RunConfig, as_dict, sweep_members
from sae_dist.data import DataUnavailableError, build_activation_source
from sae_dist.data.fanout import SharedStream
from sae_dist.parallel.context import ParallelContext
from sae_dist.train import checkpoint as ckpt
from sae_dist.train.run import check_run_dir
from sae_dist.train.trainer import Trainer


def sweep_layers(members: list[RunConfig]) -> list[int]:
    """The hooked blocks of a sweep, in the order they first appear."""
    return list(dict.fromkeys(member.model.layer for member in members))


def build_members(
    run: RunConfig, members: list[RunConfig], ctx: ParallelContext, device: torch.device
) -> list[Trainer]:
    """One trainer per sweep member, all fed by one stream of this rank's activations."""
    lm = run.data.source == "lm"
    layers = sweep_layers(members)
    source = build_activation_source(run, ctx.rank, ctx.world_size, device, layers if lm else None)
    width = source.d_model // len(layers) if lm else source.d_model
    stream = SharedStream(source, len(members))
    trainers = []
    for i, member in enumerate(members):
        site = layers.index(member.model.layer) if lm else 0
        trainers.append(Trainer(member, stream.view(i, slice(site * width, (site + 1) * width)), ctx, device))
    return trainers


def restore_common_step(trainers: list[Trainer]) -> int | None:
    """Restore every member from the newest checkpoint step they all have; None when none has one."""
    latest = [ckpt.latest_checkpoint(t.run_dir) for t in trainers]
    if all(folder is None for folder in latest):
        return None
    if any(folder is None for folder in latest):
        missing = trainers[latest.index(None)].run_dir
        raise DataUnavailableError(f"sweep member {missing} has no checkpoint while the others have; cannot resume")
    step = min(int(folder.name.removeprefix("step_")) for folder in latest)
    for trainer in trainers:
        folder = trainer.run_dir / "checkpoints" / ckpt.checkpoint_name(step)
        if not folder.is_dir():
            raise DataUnavailableError(f"sweep member {trainer.run_dir} lacks checkpoint step {step} of the others")
        trainer.restore(folder)
    return step


def train_members(trainers: list[Trainer]) -> None:
    """Step every member in turn until all have finished."""
    running = [trainer.steps() for trainer in trainers]
    while running:
        running = [loop for loop in running if next(loop, None) is not None]


def train_sweep(run: RunConfig, ctx: ParallelContext, device: torch.device) -> list[Trainer]:
    """Train the members of `run.sweep` from one stream; returns their trainers (trained)."""
    members = sweep_members(run)
    for member in members:
        check_run_dir(member)
    trainers = build_members(run, members, ctx, device)
    if ctx.is_main:
        for trainer in trainers:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            (trainer.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict(trainer.run))))
    if run.trainer.resume:
        restore_common_step(trainers)
    for trainer in trainers:
        trainer.run.trainer.resume = False  # restored above, from a step all members share
    train_members(trainers)
    return trainers
