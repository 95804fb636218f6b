"""What a process learns from the launcher that started it: torchrun restarts and SLURM jobs.

A restarted torchrun worker or a requeued SLURM job must find its run folder again, so the default folder name
(`run_stamp`) is computed from something that survives the restart: the SLURM job id, or the start time of the
torchrun agent (the workers' parent, which lives through every restart), and only otherwise the current time.
"""

from __future__ import annotations

import os
import time

STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"


def slurm_job() -> str | None:
    """'<array job id>_<task id>' for an array task, '<job id>' for another SLURM job, None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def under_torchrun() -> bool:
    """True in a worker started by torchrun (torch.distributed.elastic), whatever the number of workers."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (0 on the first attempt and outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _process_start_time(pid: int) -> float | None:
    """Start time of process `pid` in seconds since the epoch (Linux /proc), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22 (starttime, in clock ticks after boot) counted after the ')' that ends the command name.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def run_stamp(multirun_job: int | None = None) -> str:
    """The default run folder's last component: 'slurm-<job>' in a SLURM job (the same after a requeue), else the
    start time of the torchrun agent under torchrun (the same after a restart), else the time of this call; a
    Hydra multirun job adds '_<job number>' so that the jobs of one sweep never share a folder."""
    job = slurm_job()
    if job:
        stamp = f"slurm-{job}"
    else:
        started = _process_start_time(os.getppid()) if under_torchrun() else None
        stamp = time.strftime(STAMP_FORMAT, time.localtime(started if started is not None else time.time()))
    return stamp if multirun_job is None else f"{stamp}_{multirun_job}"
