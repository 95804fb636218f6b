"""torch.profiler over a window of a running job's steps (`trainer.profile_steps`): where the job's time goes.

The window covers `trainer.profile_steps` steps after the first metrics window of this session, so the warm-up,
the compilations and the first shuffle block's fill stay outside it. It records the operators of every thread
(the training loop's and the data path's prefetch thread's, torch >= 2.7) and the device's kernels. Each rank writes
`profile/steps_A-B_rank_R.json.gz`, a Chrome trace for Perfetto or chrome://tracing, and
`profile/steps_A-B_rank_R.txt`, the top operators by device time (CPU time on a CPU). On a GPU the summary also
gives the device's busy fraction: the kernels' time over the window's wall time, below 1 where the GPU waits for
the host. Rank 0 prints its summary.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch.profiler import _ExperimentalConfig
from tqdm.auto import tqdm

PROFILE_DIR = "profile"
TOP_OPERATORS = 20


def operator_table(profiler: torch.profiler.profile, device: torch.device, rows: int) -> str:
    """torch.profiler's operator table, by self device time on a GPU, else self CPU time."""
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=48)


def profiler_for(device: torch.device, all_threads: bool = False) -> torch.profiler.profile:
    """A profiler recording CPU operators (of every thread when `all_threads` and this torch can), and the device's
    kernels on a GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    experimental = _every_thread() if all_threads else None
    return torch.profiler.profile(activities=activities, experimental_config=experimental)


def _every_thread() -> _ExperimentalConfig | None:
    """Kineto's option to record the operators of every thread (torch >= 2.7), else None (the calling thread and
    those it starts)."""
    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        return None


class StepProfiler:
    """Profiles the steps after `first_step` up to `last_step` of one rank's loop; see the module doc."""

    def __init__(self, first_step: int, last_step: int, run_dir: Path, rank: int, device: torch.device, show: bool):
        self.first_step, self.last_step = first_step, last_step
        self.device, self.show = device, show
        # Named by the steps the summary counts.
        self.stem = Path(run_dir) / PROFILE_DIR / f"steps_{first_step + 1}-{last_step}_rank_{rank}"
        self.profiler: torch.profiler.profile | None = None
        self.started = 0.0

    def after_step(self, step: int) -> None:
        """Call after each step of the loop (and once before the first, with the starting step)."""
        if step == self.first_step and self.profiler is None and step < self.last_step:
            self._synchronize()
            self.profiler = profiler_for(self.device, all_threads=True)
            self.profiler.start()
            self.started = time.perf_counter()
        elif step == self.last_step and self.profiler is not None:
            self._synchronize()
            wall_s = time.perf_counter() - self.started
            profiler, self.profiler = self.profiler, None
            profiler.stop()
            self._write(profiler, wall_s)

    def close(self) -> None:
        """Stop an unfinished window (the loop ended early) without writing it."""
        if self.profiler is not None:
            profiler, self.profiler = self.profiler, None
            profiler.stop()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _write(self, profiler: torch.profiler.profile, wall_s: float) -> None:
        steps = self.last_step - self.first_step
        summary = f"torch.profiler, steps {self.first_step + 1}-{self.last_step} ({steps}), {wall_s * 1e3:.1f} ms wall"
        if self.device.type == "cuda":
            busy_us = sum(event.self_device_time_total for event in profiler.key_averages())
            summary += f"; device busy {busy_us / 1e3:.1f} ms ({busy_us / 1e6 / wall_s:.0%} of the wall time)"
        summary += "\n" + operator_table(profiler, self.device, TOP_OPERATORS)
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        _replace_with(self.stem.with_suffix(".txt"), lambda path: path.write_text(summary))
        # export_chrome_trace gzips when the name ends in .gz
        _replace_with(self.stem.with_suffix(".json.gz"), lambda path: profiler.export_chrome_trace(str(path)))
        if self.show:
            tqdm.write(f"{summary}\ntrace: {self.stem.with_suffix('.json.gz')}")


def _replace_with(path: Path, write) -> None:
    """write(a temporary path next to `path`), then rename it to `path`: no half-written file under that name."""
    partial = path.with_name(f".partial.{path.name}")
    write(partial)
    os.replace(partial, path)
