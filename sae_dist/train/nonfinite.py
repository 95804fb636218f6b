"""The non-finite policy (trainer.on_nonfinite): a step whose batch, loss or gradient norm is not finite applies no
update (`step.py`); the loop collects the steps' finite flags on the device and reads them at logging and checkpoint
steps only (one transfer, no host synchronisation in between), before anything is written, then stops with
`NonFiniteError` (stop) or counts the skipped steps (skip)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_dist.run_dir import latest_checkpoint


class NonFiniteError(ValueError):
    """A step met NaN or inf under trainer.on_nonfinite=stop; the message is one line naming the step."""


class FiniteFlags:
    """The finite flags of the steps since the last check. `policy`: trainer.on_nonfinite; `run_dir`: where the
    last good checkpoint is named in the error; `show`: warn about skipped steps (rank 0)."""

    def __init__(self, policy: str, run_dir: Path, show: bool):
        self.policy, self.run_dir, self.show = policy, run_dir, show
        self.unchecked: list[tuple[int, Tensor]] = []
        """(step, 0-dim bool on the device) since the last check."""

    def add(self, step: int, finite: Tensor) -> None:
        self.unchecked.append((step, finite))

    def check(self, step: int, skipped_before: int) -> int:
        """Read the flags (every rank holds the same); raise NonFiniteError under trainer.on_nonfinite=stop, else
        return how many steps the run has skipped, `skipped_before` of them before these. `step`: the step just
        taken."""
        if not self.unchecked:
            return skipped_before
        flags = torch.stack([flag for _, flag in self.unchecked]).tolist()
        bad = [at for (at, _), ok in zip(self.unchecked, flags, strict=True) if not ok]
        self.unchecked.clear()
        if not bad:
            return skipped_before
        if self.policy == "stop":
            latest = latest_checkpoint(self.run_dir)
            kept = f"the last checkpoint is {latest.name}" if latest is not None else "no checkpoint was written"
            raise NonFiniteError(
                f"step {bad[0]}: NaN or inf in the batch, the loss or the gradient norm (no update applied); "
                f"stopped at step {step} without writing a checkpoint ({kept}); check the activations, or "
                "pass trainer.on_nonfinite=skip to skip such steps"
            )
        skipped = skipped_before + len(bad)
        if self.show:
            tqdm.write(f"warning: skipped {len(bad)} step(s) with NaN or inf (first: step {bad[0]}); "
                       f"{skipped} skipped in this run")
        return skipped
