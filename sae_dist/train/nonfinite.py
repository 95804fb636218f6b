"""The non-finite policy (trainer.on_nonfinite): a step whose batch, loss or gradient norm is not finite applies no
update (`step.py`); the loop collects the steps' finite flags on the device and reads them at logging and checkpoint
steps only (one transfer, no host synchronisation in between), before anything is written, then stops with
`NonFiniteError` (stop) or counts the skipped steps (skip).

Under skip, a run that learns nothing must not end as a success: it stops with `NoUpdateError` (exit status
NO_UPDATE_EXIT_STATUS) once MAX_SKIPPED_IN_A_ROW steps in a row were skipped, or when it reaches its last step
without having applied a single update. A stop signal is not an end: a preempted run is requeued (`preemption.py`)
whatever it has applied. Untouched weights are never checkpointed (`Trainer.steps`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_dist.run_dir import latest_checkpoint

NO_UPDATE_EXIT_STATUS = 65
"""EX_DATAERR (sysexits.h): the input data was bad throughout (every step skipped for NaN or inf), so running the
same command again cannot help, unlike 75 (EX_TEMPFAIL); and unlike 2 it is found only after training began."""
MAX_SKIPPED_IN_A_ROW = 100
"""Consecutive skipped steps after which a run under trainer.on_nonfinite=skip stops with NoUpdateError."""


class NonFiniteError(ValueError):
    """A step met NaN or inf under trainer.on_nonfinite=stop; the message is one line naming the step."""


class NoUpdateError(Exception):
    """Under trainer.on_nonfinite=skip, the last MAX_SKIPPED_IN_A_ROW steps or every step of the run were skipped;
    the message is one line naming the skipped steps, the last checkpoint and what to check."""


class FiniteFlags:
    """The finite flags of the steps since the last check. `policy`: trainer.on_nonfinite; `run_dir`: where the
    last good checkpoint is named in the error; `show`: warn about skipped steps (rank 0)."""

    def __init__(self, policy: str, run_dir: Path, show: bool):
        self.policy, self.run_dir, self.show = policy, run_dir, show
        self.unchecked: list[tuple[int, Tensor]] = []
        """(step, 0-dim bool on the device) since the last check."""

    def add(self, step: int, finite: Tensor) -> None:
        self.unchecked.append((step, finite))

    def check(self, step: int, skipped_before: int, since_before: int | None, last: bool) -> tuple[int, int | None]:
        """Read the flags (every rank holds the same); return (steps skipped in the run, the first step of the
        skipped steps that end at `step`: None when `step` applied an update), given the same two before these.
        `step`: the step just taken; `last`: `step` is the run's last (trainer.steps).

        Raises NonFiniteError under trainer.on_nonfinite=stop, NoUpdateError under skip when MAX_SKIPPED_IN_A_ROW
        steps in a row were skipped, or at the run's last step when it skipped every step."""
        if not self.unchecked:
            return skipped_before, since_before
        flags = torch.stack([flag for _, flag in self.unchecked]).tolist()
        bad = [at for (at, _), ok in zip(self.unchecked, flags, strict=True) if not ok]
        since = since_before
        for (at, _), ok in zip(self.unchecked, flags, strict=True):
            since = None if ok else (at if since is None else since)
        self.unchecked.clear()
        if not bad:
            return skipped_before, since
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {bad[0]}: NaN or inf in the batch, the loss or the gradient norm (no update applied); "
                f"stopped at step {step} without writing a checkpoint ({self._kept()}); check the activations, or "
                "pass trainer.on_nonfinite=skip to skip such steps"
            )
        skipped = skipped_before + len(bad)
        in_a_row = step - since + 1 if since is not None else 0
        if in_a_row >= MAX_SKIPPED_IN_A_ROW or (last and since == 1):
            what = "every step of the run" if since == 1 else f"the last {in_a_row} steps in a row"
            raise NoUpdateError(
                f"no update applied: {what} skipped for NaN or inf in the batch, the loss or the gradient norm "
                f"({in_a_row} steps since step {since}, {skipped} in this run); stopped at step {step} "
                f"({self._kept()}); check the activations (data.cache_dir or the model's outputs at the hooked site) "
                "for NaN or inf"
            )
        if self.show:
            tqdm.write(f"warning: skipped {len(bad)} step(s) with NaN or inf (first: step {bad[0]}); "
                       f"{skipped} skipped in this run")
        return skipped, since

    def _kept(self) -> str:
        latest = latest_checkpoint(self.run_dir)
        return f"the last checkpoint is {latest.name}" if latest is not None else "no checkpoint was written"
