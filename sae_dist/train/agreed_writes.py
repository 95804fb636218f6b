"""Files that every rank writes in phases (a checkpoint): after each phase the ranks agree whether any of them
failed, so that all fail together instead of waiting for each other, and a disk error becomes one line.

torch.save's zip writer drops the errno of a failed write (on a full disk it says only 'unexpected pos N vs M'),
and torch.distributed.checkpoint wraps each rank's failure in a CheckpointException (a BaseException): both are
traced back to the disk error here.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from sae_dist.parallel.context import ParallelContext

TORCH_WRITE_FAILURE = ("PytorchStreamWriter failed", "inline_container.cc", "unexpected pos")
"""What torch.save's zip writer says when a write fails."""
FULL_DISK_BYTES = 1 << 20
"""A filesystem with less free space than this after a failed write is taken to be full."""


class WriteFailedError(ValueError):
    """A phased write failed on some rank; the message is one line naming the disk error."""

    def __init__(self, message: str, report_here: bool = True):
        super().__init__(message)
        self.report_here = report_here
        """False on the ranks that only learned that another rank failed (the launcher prints nothing for them)."""


def existing_ancestor(path: Path) -> Path:
    """`path`, or its nearest parent that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_error(exc: BaseException, folder: Path) -> OSError | None:
    """The OSError behind a failed write: `exc` itself, its cause, one a rank reported inside a DCP
    CheckpointException, or, for torch.save's errno-less error, ENOSPC when `folder`'s disk is full (EIO
    otherwise). None for an error that is not about writing files."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in TORCH_WRITE_FAILURE):
        code = errno.ENOSPC if shutil.disk_usage(existing_ancestor(folder)).free < FULL_DISK_BYTES else errno.EIO
        return OSError(code, os.strerror(code))
    for failure in (getattr(exc, "failures", None) or {}).values():
        found = disk_error(failure[0] if isinstance(failure, tuple) else failure, folder)
        if found is not None:
            return found
    return disk_error(exc.__cause__, folder) if exc.__cause__ is not None else None


def _run(phase: Callable[[], None]) -> BaseException | None:
    try:
        phase()
    except (Exception, CheckpointException) as exc:  # handed to every rank by _agree
        return exc
    return None


def _agree(ctx: ParallelContext, device: torch.device, error: BaseException | None, folder: Path,
           describe: Callable[[OSError], str], error_type: type[WriteFailedError]) -> None:
    failed_W = torch.zeros(ctx.world_size, device=device)
    failed_W[ctx.rank] = float(error is not None)
    failed_ranks = ctx.all_reduce_sum(failed_W).nonzero().flatten().tolist()
    if not failed_ranks:
        return
    if error is None:
        raise error_type(f"rank {failed_ranks[0]} failed to write", report_here=False)
    disk = disk_error(error, folder)
    if disk is None:
        raise error
    raise error_type(describe(disk), report_here=ctx.rank == failed_ranks[0]) from error


def write_in_phases(
    ctx: ParallelContext,
    device: torch.device,
    phases: Sequence[Callable[[], None]],
    folder: Path,
    describe: Callable[[OSError], str],
    discard: Callable[[], None],
    error_type: type[WriteFailedError] = WriteFailedError,
) -> None:
    """Run `phases` in order on every rank (`device`: where the agreement's flags live). When a phase fails on any
    rank, rank 0 calls `discard()` and every rank raises: a failing rank `error_type(describe(its disk error))`, to
    be printed by the lowest failing rank only (`report_here`), the others `error_type(..., report_here=False)`; an
    error that is not about the disk is re-raised as it is."""
    for phase in phases:
        try:
            _agree(ctx, device, _run(phase), folder, describe, error_type)
        except BaseException:
            if ctx.is_main:
                discard()
            with suppress(Exception):  # after a disk error every rank is here; after a dead rank this fails too
                ctx.barrier()
            raise
