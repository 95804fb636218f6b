"""What a process learns from the launcher that started it: torchrun restarts and SLURM jobs.

A restarted torchrun worker or a requeued SLURM job must find its run folder again, so the default folder name
(`run_stamp`) is computed from something that survives the restart: the SLURM job id, or the start time of the
torchrun agent (the workers' parent, which lives through every restart), and only otherwise the current time.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

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


def run_stamp(sweep_job: str | None = None) -> str:
    """The default run folder below runs/<name>: 'slurm-<job>' in a SLURM job (the same after a requeue), else the
    start time of the torchrun agent under torchrun (the same after a restart), else the time of this call.

    A job of a Hydra multirun sweep gets '<sweep stamp>/<sweep_job>' (`sweep_job` names its swept values, e.g.
    'sae.k=16,sae.num_experts=8'): the stamp is shared by the jobs of one sweep (the SLURM array's id, or the start
    time of this process, which runs every job of a local sweep), so one sweep is one folder with a run per job."""
    job = slurm_job() if sweep_job is None else os.environ.get("SLURM_ARRAY_JOB_ID") or slurm_job()
    if job:
        stamp = f"slurm-{job}"
    else:
        pid = os.getppid() if under_torchrun() else os.getpid() if sweep_job is not None else None
        started = _process_start_time(pid) if pid is not None else None
        stamp = time.strftime(STAMP_FORMAT, time.localtime(started if started is not None else time.time()))
    return stamp if sweep_job is None else f"{stamp}/{sweep_job}"


def sweep_job_name(hydra_cfg: Any) -> str:
    """A multirun job's folder name: its values of the swept settings ('sae.k=16,sae.num_experts=8'; '/' becomes
    '_'), the swept settings being those with sweep syntax on the command line or in hydra.sweeper.params; the job
    number when none is found."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    swept = set(hydra_cfg.sweeper.get("params") or {})
    try:
        swept |= {o.key_or_group for o in parser.parse_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
                  if o.is_sweep_override()}
    except OverrideParseException:  # not a Hydra command line (a launcher's job runner): the sweeper's params
        pass
    job = [o for o in parser.parse_overrides(list(hydra_cfg.overrides.task)) if o.key_or_group in swept]
    name = ",".join(f"{o.key_or_group}={o.value()}" for o in sorted(job, key=lambda o: o.key_or_group))
    return name.replace("/", "_") or str(hydra_cfg.job.num)
