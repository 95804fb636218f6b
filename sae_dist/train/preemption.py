"""Preemption: SIGTERM and SIGUSR1 (SLURM's warning before a time limit or a preemption) end a run cleanly.

While `StopSignals` is active, either signal only records a request. The training loop honours it at the end of a
step: at once in one process, and at the next logging or checkpoint step under torchrun, where the ranks agree on
it (so every rank stops after the same step). Every rank then writes the checkpoint of that step (none while every
step so far was skipped for NaN or inf: untouched weights are never checkpointed) and raises `StopRequested`; the
launcher exits with REQUEUE_EXIT_STATUS whatever the run has applied, and the same command with the run's folder
(trainer.out_dir, trainer.resume=auto) continues the run from that checkpoint. The SAEs of a sweep, which step in
turn, share one handler and read it through `HeldSignals`, so that all of them stop after the same step.

`request_stop` is the same request from another thread (a torchrun worker whose agent is gone, `parent_watch`).
Once a run has stopped on request the process is on its way out with REQUEUE_EXIT_STATUS, and a request then does
nothing: the handler is restored by then, and a SIGTERM would kill the process mid-exit, its status lost (seen: a
rank that stopped with the others, on another rank's request, then killed by its own watch a moment later).
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from types import FrameType

import torch

from sae_dist.parallel.context import ParallelContext

REQUEUE_EXIT_STATUS = 75
"""EX_TEMPFAIL (sysexits.h): stopped on request with a checkpoint written; run the same command again."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_HANDLERS_LOCK = threading.Lock()
"""Held while a `StopSignals` installs or restores its handler and while `request_stop` signals this process."""
_stopped_on_request = False
"""A run of this process has raised StopRequested out of its `StopSignals` block."""


def out_dir_override(folder: str | Path) -> str:
    """The command-line override `trainer.out_dir=FOLDER` that continues the run in `folder`, quoted for Hydra and
    for the shell where it must be (a multirun job's folder: '.../sae.k=16,sae.num_experts=4')."""
    folder = str(folder)
    return f"trainer.out_dir={folder}" if re.fullmatch(r"[\w./-]+", folder) else f"\"trainer.out_dir='{folder}'\""


class StopRequested(Exception):
    """The run stopped on a signal after writing a checkpoint (none when no step had applied an update)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, written: str | None = None,
                 out_dir: Path | None = None):
        """`checkpoint`: the one written, None when none was (no step had applied an update, `nonfinite.py`);
        `written` describes the checkpoints written (default: 'checkpoint written: <checkpoint>'); `out_dir` is
        the trainer.out_dir that continues the run (default: the checkpoint's run folder; needed without one). The
        message names it because a command without trainer.out_dir starts a new folder, named by its start time,
        unless a SLURM requeue or a torchrun restart runs it."""
        override = out_dir_override(out_dir or checkpoint.parent.parent)
        super().__init__(
            f"stopped by {signal_name} after step {step}; {written or f'checkpoint written: {checkpoint}'}; "
            f"the same command with {override} (trainer.resume=auto) continues the run"
        )
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


class StopSignals:
    """Context manager: records SIGTERM / SIGUSR1 instead of dying (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.received: str | None = None
        """Name of the first stop signal received, or None."""
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            with _HANDLERS_LOCK:
                self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        global _stopped_on_request
        with _HANDLERS_LOCK:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}
            if exc_type is not None and issubclass(exc_type, StopRequested):
                _stopped_on_request = True


def request_stop() -> None:
    """From any thread, stop this process as a SIGTERM does: a recorded request while a `StopSignals` is active, the
    end of the process before one is; nothing once a run has stopped on request (module docstring)."""
    with _HANDLERS_LOCK:
        if not _stopped_on_request:
            # Delivered before kill() returns, so while the handler seen here is still installed.
            os.kill(os.getpid(), signal.SIGTERM)


class HeldSignals:
    """The stop request of `signals` as it stood at the last `hold()`. The SAEs of a sweep step in turn and read
    this, held between rounds of steps: a signal that arrives between two members' steps or saves stops every member
    after the same step (the next round's), and the continued sweep resumes all of them from it."""

    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals
        self.received: str | None = None

    def hold(self) -> None:
        self.received = self.signals.received


def agreed_stop(signals: StopSignals | HeldSignals, ctx: ParallelContext, device: torch.device,
                at_sync_point: bool) -> str | None:
    """The stop signal to honour after this step, if any: in one process as soon as it arrives; under torchrun at
    logging and checkpoint steps (`at_sync_point`), when the ranks agree (one small all-reduce), so all stop
    together."""
    if not ctx.distributed:
        return signals.received
    if not at_sync_point:
        return None
    flag = torch.tensor([0.0 if signals.received is None else 1.0], device=device)
    if float(ctx.all_reduce_sum(flag).sum()) == 0:
        return None
    return signals.received or "a stop signal to another rank"
