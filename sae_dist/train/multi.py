"""Several SAEs from one LM pass: `run.sweep` trains SAEs of other sizes, k or hook sites on one activation stream.

The language model runs once over the text, reading every site in the same forward (rows hold the sites
side by side, a transcoder's target among them); a `SharedStream` hands each batch to every member, cut to its
site, or to a transcoder's two sites [x | y]. Each member is an ordinary
`Trainer` with its own run folder (trainer.out_dir/<name>: config, metrics, checkpoints), and the members step
in turn, so member i's batch j is the batch j that a run of member i alone would see: a sweep equals its members
trained separately on the same stream (tested), at the price of one LM pass.

Each member is checked and continued like a run of its own (`plan.prepare_run`: its folder, its identity on resume,
memory and disk). Stop signals (SIGTERM, SIGUSR1): one handler for all members, read between rounds of steps
(`HeldSignals`), so every member takes the same last step and checkpoints it before the sweep stops. Resume: the
members restore the newest checkpoint step that all of them have (a crash between two members' saves leaves one a
checkpoint ahead), so the shared stream continues from one position. So that such a step exists whatever
`trainer.keep_checkpoints`, members rotate their older checkpoints away only once every member has saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sae_dist.config import RunConfig
from sae_dist.data import ActivationSource, DataUnavailableError, build_activation_source, site_columns
from sae_dist.data.fanout import SharedStream, StreamView
from sae_dist.data.sites import check_target_width
from sae_dist.parallel.context import ParallelContext
from sae_dist.parallel.failures import on_every_rank
from sae_dist.run_dir import CHECKPOINTS_DIR, checkpoint_name, latest_checkpoint
from sae_dist.site_names import site_key
from sae_dist.train import preflight
from sae_dist.train.plan import RunPlan, finish_run, prepare_run, start_trainer
from sae_dist.train.preemption import HeldSignals, StopRequested, StopSignals
from sae_dist.train.trainer import Trainer


def prepare_sweep(run: RunConfig, world_size: int = 1, overrides: list[str] | None = None) -> list[RunPlan]:
    """Every member of `run.sweep` checked as a run of its own (see `plan.prepare_run`)."""
    return [prepare_run(member, world_size, overrides) for member in preflight.expanded_sweep_members(run)]


def member_sites(member: RunConfig) -> list[int | str]:
    """The sites a member's rows hold, in their order: its input site (a block number or hookpoint), then a
    transcoder's target (rows [x | y])."""
    target = member.model.target_hookpoint
    return [site_key(member.model), *([] if target is None else [target])]


def sweep_sites(members: list[RunConfig]) -> list[int | str]:
    """The sites of a sweep (block numbers, hookpoints), inputs and targets, in the order they first appear."""
    return list(dict.fromkeys(site for member in members for site in member_sites(member)))


def member_sources(members: list[RunConfig], source: ActivationSource) -> list[StreamView]:
    """Each member's source over one stream of `source`: over data.source=lm, a source reading `sweep_sites(members)`
    in one pass, of which each member takes the columns of its own sites, [x] or [x | y] (a target of another
    width than its sae.d_out: one-line ConfigError); else the whole rows."""
    lm = members[0].data.source == "lm"
    columns = site_columns(source) if lm else [slice(None)]
    sites = sweep_sites(members)
    stream = SharedStream(source, len(members))
    views = []
    for i, member in enumerate(members):
        own = [columns[sites.index(site)] for site in member_sites(member)] if lm else columns
        if lm:
            check_target_width(member.model, own[-1].stop - own[-1].start, member.sae.d_out)
        views.append(stream.view(i, own))
    return views


def build_members(plans: list[RunPlan], ctx: ParallelContext) -> list[Trainer]:
    """One trainer per sweep member, all fed by one stream of this rank's activations (`member_sources`)."""
    first = plans[0].run
    members = [plan.run for plan in plans]
    sites = sweep_sites(members) if first.data.source == "lm" else None
    source = build_activation_source(first, ctx.rank, ctx.world_size, plans[0].device, sites)
    trainers = []
    for i, (plan, view) in enumerate(zip(plans, member_sources(members, source), strict=True)):
        trainer = start_trainer(plan, ctx, view)
        trainer.defer_rotation = True  # step_round rotates once every member has saved
        trainer.profiles = i == 0  # one profiler at a time; the first member's window covers every member's steps
        trainers.append(trainer)
    return trainers


def resume_from_common_step(trainers: list[Trainer]) -> int | None:
    """Make every member continue from the newest checkpoint step they all have; None when none has one."""
    latest = [latest_checkpoint(t.run_dir) for t in trainers]
    if all(folder is None for folder in latest):
        return None
    if any(folder is None for folder in latest):
        missing = trainers[latest.index(None)].run_dir
        raise DataUnavailableError(f"sweep member {missing} has no checkpoint while the others have; cannot resume")
    step = min(int(folder.name.removeprefix("step_")) for folder in latest)
    for trainer in trainers:
        folder = trainer.run_dir / CHECKPOINTS_DIR / checkpoint_name(step)
        if not folder.is_dir():
            raise DataUnavailableError(f"sweep member {trainer.run_dir} lacks checkpoint step {step} of the others")
        trainer.resume_from = folder
    return step


def train_members(trainers: list[Trainer]) -> None:
    """Resume every member (each rewinds the shared stream to the same position), then step them in turn until all
    have finished; on a stop signal every member checkpoints the same step, then StopRequested is raised."""
    with StopSignals() as signals:
        held = HeldSignals(signals)
        running = {trainer: trainer.steps(held) for trainer in trainers}
        try:
            for loop in running.values():
                next(loop)
            while running:
                held.hold()
                running = step_round(running)
        finally:
            for loop in running.values():
                loop.close()


def step_round(running: dict[Trainer, Iterator[int]]) -> dict[Trainer, Iterator[int]]:
    """One step of every running member (trainer: its `steps()` loop); return those still running. Raise
    StopRequested once every member that stopped on a signal (all of them: they read one held request) has written
    its checkpoint."""
    still, stopped = {}, []
    for trainer, loop in running.items():
        try:
            if next(loop, None) is not None:
                still[trainer] = loop
        except StopRequested as stop:
            stopped.append(stop)
    for trainer in running:  # every member has checkpointed this round's step, if it was one to checkpoint
        if stopped or trainer.checkpoint_due():
            trainer.rotate_checkpoints()
    if stopped:
        first, sweep_dir = stopped[0], next(iter(running)).run_dir.parent
        saved = [stop.checkpoint for stop in stopped if stop.checkpoint is not None]
        unsaved = len(stopped) - len(saved)  # members whose every step so far was skipped write none
        written = (f"checkpoints {saved[0].name} written for {len(saved)} SAEs of the sweep in {sweep_dir}" if saved
                   else f"no checkpoint written for the sweep in {sweep_dir}")
        if unsaved:
            written += f" ({unsaved} SAEs have applied no update)"
        raise StopRequested(first.signal_name, first.step, saved[0] if saved else None, written, sweep_dir)
    return still


def train_sweep(plans: list[RunPlan], ctx: ParallelContext, eval_batches: int = 4) -> list[dict[str, Any]]:
    """Train the prepared members of a sweep from one stream; return each member's result (`plan.finish_run`)."""
    if ctx.is_main:
        for plan in plans:
            print(f"run folder: {plan.folder.describe()}", flush=True)
    trainers = on_every_rank(lambda: build_members(plans, ctx))
    try:
        resume_from_common_step(trainers)
        train_members(trainers)
        return [finish_run(trainer, eval_batches) for trainer in trainers]
    finally:
        trainers[0].source.close()  # also on a stop signal or an error: see `data.prefetch.PrefetchingSource.close`
