"""When a rank fails: the others must neither hang nor print the same error W times.

`collective_failure` turns the error of a collective that timed out or lost its peer (another rank died or
stalled) into one line naming the collective and the sae-dist code that issued it. `on_every_rank` runs a piece of
work on every rank and makes all of them fail together when any one does, the error reported by one rank only.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed because another rank died or stalled; the message is one line naming it."""


def _called_collective(exc: BaseException) -> tuple[str, str] | None:
    """(torch.distributed function, 'file:line' of the sae-dist code that called it) from a traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    for i, frame in enumerate(frames):
        if frame.filename.endswith("distributed_c10d.py"):
            callers = [f for f in frames[:i] if "/torch/" not in f.filename]
            where = f"{os.path.basename(callers[-1].filename)}:{callers[-1].lineno}" if callers else "?"
            return frame.name, where
    return None


def collective_failure(exc: BaseException, rank: int, timeout_s: float, during: str) -> CollectiveError | None:
    """A one-line CollectiveError for an exception raised inside a torch.distributed collective, else None.

    `during` says what the rank was doing (e.g. 'step 120' or 'the checkpoint of step 100')."""
    called = _called_collective(exc)
    if called is None and not isinstance(exc, dist.DistError):
        return None
    name, where = called or ("a collective", "?")
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    reason = reason.split("] ", 1)[-1] if reason.startswith("[") else reason  # gloo's source location
    reason = reason.split(". ", 1)[0]  # gloo's advice to read the other rank's log follows the first sentence
    return CollectiveError(
        f"collective {name} ({where}) failed on rank {rank} during {during}: another rank died or stalled "
        f"(parallel.timeout_s={timeout_s:g}): {reason}"
    )


T = TypeVar("T")


class PeerFailedError(RuntimeError):
    """Another rank failed and reported its error; this rank stops with it."""

    report_here = False


def on_every_rank(fn: Callable[[], T]) -> T:
    """fn() on every rank of the initialised world (plain fn() without one). If it raises anywhere, every rank
    raises: the lowest failing rank its own error (with `report_here = True`: the one to print), the others
    PeerFailedError. So an error met by one rank alone, e.g. its data shard being empty, is printed once and
    never leaves the other ranks waiting in a collective."""
    if not dist.is_initialized():
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # handed to every rank below
        error = exc
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    first = torch.tensor([rank if error is not None else world], device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if int(first) == world:
        return result
    if error is not None and int(first) == rank:
        error.report_here = True
        raise error
    raise PeerFailedError(f"rank {int(first)} failed")
