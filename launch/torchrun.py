"""torchrun with a one-line failure: `python launch/torchrun.py [torchrun options] launch/train.py [overrides]`.

The same agent as `torchrun` (`torch.distributed.run`, in this process: the same options, restarts and signal
handling), except when its workers fail for good: instead of torchrun's ~40-line `ChildFailedError` traceback and
its exit status 1, it prints one line naming the first rank that failed and its exit status, and exits with that
status, so that a script can tell bad input (2) from no update applied (65), a stop to requeue (75) and a crash (1)
as it can without torchrun. The workers' own lines, printed above it, say why. A worker killed by signal N exits
128 + N. A signal handed to the agent (`--signals-to-handle`) ends it with one line too, not torchrun's traceback:
after SIGTERM or SIGUSR1, on which the workers write a checkpoint and stop, with status 75 (run the same command
again to continue); after another signal N, with 128 + N. docs/fault-tolerance.md lists the statuses.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from sae_dist.train.preemption import REQUEUE_EXIT_STATUS, STOP_SIGNALS


def exit_status(exitcode: int) -> int:
    """A worker's exit code as a shell reports it: a signal's negative code -N as 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        status = exit_status(failure.exitcode) or 1
        print(f"torchrun: {failed.name} failed on rank {rank} first, exit status {status} (its lines above say why)",
              file=sys.stderr)
        sys.exit(status)
    except SignalException as stopped:
        name = signal.Signals(stopped.sigval).name
        if stopped.sigval in STOP_SIGNALS:
            print(f"torchrun: stopped by {name}, which the workers were handed to write a checkpoint and stop (their "
                  "lines above say whether they did); the same command continues the run", file=sys.stderr)
            sys.exit(REQUEUE_EXIT_STATUS)
        print(f"torchrun: stopped by {name}, handed to the workers", file=sys.stderr)
        sys.exit(exit_status(-stopped.sigval))


if __name__ == "__main__":
    main()
