"""A run's training state and its checkpoints: `TrainState` is everything a checkpoint holds (model, optimizer and
lr schedule, dead-latent counters, data position, RNG, progress counters); `CheckpointManager` saves it, rotates
old checkpoints, restores it, and resumes a run after checking that the checkpoint defines the same run
(`identity`), recording each resume in the run's history. The file format is `checkpoint.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_dist.config import RunConfig
from sae_dist.data.order import resume_state
from sae_dist.data.source import ActivationSource
from sae_dist.models import SAE
from sae_dist.parallel.context import ParallelContext
from sae_dist.run_dir import CHECKPOINTS_DIR, INPUT_SCALE_KEY, TARGET_SCALE_KEY, read_checkpoint_config
from sae_dist.train import checkpoint as ckpt
from sae_dist.train import identity
from sae_dist.train.engine import Engine
from sae_dist.train.latents import LatentBookkeeping
from sae_dist.train.logging import append_history


@dataclass
class TrainState:
    """What a checkpoint saves and restores, and the run's progress."""

    model: SAE
    engine: Engine
    latents: LatentBookkeeping
    source: ActivationSource
    step: int = 0
    """Steps taken."""
    tokens: int = 0
    """Tokens trained on (global batch size times steps)."""
    nonfinite_steps: int = 0
    """Steps skipped because of NaN or inf (trainer.on_nonfinite=skip), over the whole run."""
    skipped_since: int | None = None
    """The first of the skipped steps that end at `step` (None: `step` applied an update; 1: none has yet)."""
    input_scale: float | None = None
    """s, the factor the activations are multiplied by (data.normalize_activations; a transcoder's inputs x: s_x);
    None: not normalised."""
    target_scale: float | None = None
    """s_y, the factor a transcoder's targets y are multiplied by; None: not normalised, or an SAE (y is x)."""

    def tensors(self) -> ckpt.TrainingTensors:
        return ckpt.TrainingTensors(self.model, self.engine.optimizer_state(), self.latents.dead.tokens_since_fired_L)

    def run_state(self) -> dict[str, Any]:
        """What every rank holds alike (written once)."""
        state = {"step": self.step, "tokens": self.tokens, "scheduler": self.engine.scheduler.state_dict(),
                 "nonfinite_steps": self.nonfinite_steps, "skipped_since": self.skipped_since,
                 "resampled": self.latents.resampled}
        if self.input_scale is not None:  # the checkpoint's config.json records it too, for `load_sae`
            state[INPUT_SCALE_KEY] = self.input_scale
        if self.target_scale is not None:
            state[TARGET_SCALE_KEY] = self.target_scale
        return state

    def rank_state(self) -> dict[str, Any]:
        """What each rank holds on its own."""
        return {"data": self.source.state_dict(), "torch_rng": torch.get_rng_state()}

    def load(self, run_state: dict[str, Any], rank_states: list[dict[str, Any]], ctx: ParallelContext) -> None:
        """Continue from the states of a checkpoint saved on any layout (see `checkpoint` for the data rule); the
        tensors are loaded by `checkpoint.load_checkpoint`."""
        self.step, self.tokens = run_state["step"], run_state["tokens"]
        self.nonfinite_steps = run_state.get("nonfinite_steps", 0)
        self.skipped_since = run_state.get("skipped_since")
        self.latents.resampled = run_state.get("resampled", 0)
        self.input_scale = run_state.get(INPUT_SCALE_KEY)
        self.target_scale = run_state.get(TARGET_SCALE_KEY)
        self.engine.scheduler.load_state_dict(run_state["scheduler"])
        data_states = [state["data"] for state in rank_states]
        self.source.load_state_dict(resume_state(data_states, ctx.rank, ctx.world_size))
        torch.set_rng_state(rank_states[ctx.rank % len(rank_states)]["torch_rng"])


class CheckpointManager:
    """Checkpoints of `state` in the run folder of `run` (every method that writes or reads is collective)."""

    def __init__(self, state: TrainState, run: RunConfig, d_model: int, ctx: ParallelContext):
        self.state, self.run, self.d_model, self.ctx = state, run, d_model, ctx
        self.run_dir = Path(run.trainer.out_dir)
        self.verified: Path | None = None
        """A checkpoint whose files were checked against its SHA256SUMS before anything loaded (`plan.prepare_run`):
        restoring it reads them without a second pass."""

    def due(self) -> bool:
        """Whether the step just taken is checkpointed (every `trainer.checkpoint_every`, and the last)."""
        step = self.state.step
        return step % self.run.trainer.checkpoint_every == 0 or step == self.run.trainer.steps

    def save(self, rotate: bool = True) -> Path:
        """Write a checkpoint of the step just taken; older ones are rotated away at once unless not `rotate`."""
        state = self.state
        return ckpt.save_checkpoint(self.run_dir, self.run, self.d_model, state.step, state.tensors(),
                                    state.run_state(), state.rank_state(), self.ctx, rotate=rotate)

    def rotate(self) -> None:
        """Keep only the newest `trainer.keep_checkpoints` checkpoints (rank 0 deletes the others)."""
        if self.ctx.is_main:
            ckpt.rotate_checkpoints(self.run_dir / CHECKPOINTS_DIR, self.run.trainer.keep_checkpoints, self.state.step)

    def remove_partial(self) -> None:
        """Remove what killed saves left (rank 0), before anything is read."""
        if self.ctx.is_main:
            ckpt.remove_partial_checkpoints(self.run_dir)
        self.ctx.barrier()

    def restore(self, folder: Path) -> None:
        """Continue from the checkpoint in `folder`, written on any layout."""
        verified = self.verified is not None and Path(folder).resolve() == self.verified.resolve()
        run_state, rank_states = ckpt.load_checkpoint(folder, self.state.tensors(), self.ctx, verified)
        self.state.load(run_state, rank_states, self.ctx)

    def resume(self, folder: Path | None = None) -> Path | None:
        """Continue from `folder`, else from the run's latest checkpoint as trainer.resume says; return the
        checkpoint continued from (None: none).

        The checkpoint's config must define the same run (`identity`); the changes allowed on resume are recorded
        in the run's resume history with the line 'resumed from step N (tokens T) on W ranks', also printed."""
        folder = folder or identity.checkpoint_to_resume(self.run, self.run_dir)
        if folder is None:
            return None
        saved, _, _ = read_checkpoint_config(folder)
        _, changes = identity.continue_config(saved, self.run)
        self.restore(folder)
        world, step, tokens = self.ctx.world_size, self.state.step, self.state.tokens
        message = f"resumed from step {step} (tokens {tokens:,}) on {world} rank{'s' if world > 1 else ''}"
        if self.ctx.is_main:
            print(message, flush=True)
            append_history(self.run_dir, {
                "event": "resume", "message": message, "checkpoint": folder.name, "step": step, "tokens": tokens,
                "world_size": world, "ep_size": world // self.ctx.expert_replicas, "changes": changes,
            })
        return folder
