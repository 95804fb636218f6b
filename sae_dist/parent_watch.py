"""Workers that end with their launcher: a torchrun worker whose agent is gone stops, after a checkpoint when it can.

torchrun's agent is the workers' parent. When the agent dies without ending them (SIGKILL, an OOM kill, a signal it
does not handle: SIGUSR1 or SIGUSR2 without --signals-to-handle), the workers are re-parented and would train on
unsupervised, holding the run folder and the GPUs, while a restarted job starts beside them. A daemon thread
polls the parent pid every `POLL_S` seconds; when it changes, it calls `stop` (the training command's:
`sae_dist.train.preemption.request_stop`, which the trainer turns into a checkpoint and a stop, under torchrun at
the next logging or checkpoint step, agreed by every rank still alive). If the process is still alive `grace_s`
seconds later (a collective waiting for a rank that died with its agent, until `parallel.timeout_s`; a stop
before the trainer's handler is installed is immediate), it exits with status 1 at once.

Polling rather than prctl(PR_SET_PDEATHSIG): the death signal fires when the *thread* that spawned the worker
exits, and is lost if the parent died before the call; a pid poll has neither problem and costs nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from sae_dist.console import say

POLL_S = 1.0
"""Seconds between two looks at the parent pid."""
ORPHANED_EXIT_STATUS = 1


def watch_parent(stop: Callable[[], None], grace_s: float, poll_s: float = POLL_S) -> threading.Thread:
    """Start the watch (module docstring) for this process's current parent; returns its daemon thread."""
    parent = os.getppid()
    thread = threading.Thread(target=_watch, args=(parent, stop, grace_s, poll_s), name="parent-watch", daemon=True)
    thread.start()
    return thread


def _watch(parent: int, stop: Callable[[], None], grace_s: float, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    say(f"error: the launcher (pid {parent}) is gone; stopping this worker (rank {os.environ.get('RANK', '0')}) "
        "after a checkpoint")
    stop()
    time.sleep(grace_s)
    say(f"error: the worker did not stop within {grace_s:.0f} s of its launcher's end; exiting")
    os._exit(ORPHANED_EXIT_STATUS)
