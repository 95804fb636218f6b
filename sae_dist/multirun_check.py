"""A Hydra multirun (`launch/train.py -m sae.k=8,16 ...`) checked whole before its first job trains.

Hydra composes and runs the jobs of a sweep one after the other, so a bad value in the last job used to surface
after the others had trained, and jobs sharing one trainer.out_dir were refused one by one. `CheckEveryJob`, a
Hydra callback registered in conf/config.yaml (`hydra.callbacks`), composes every job's config the way the sweeper
and launcher will (the sweeper's params, then the command line's sweep, one job per combination) and, before any
job starts:
  - validates each job's values (`to_run_config`), naming the job in the one-line error;
  - refuses jobs that would share a run folder (a fixed trainer.out_dir), naming both;
  - with the local launcher, runs each job's checks that need neither model nor data (`prepare_run`: the run
    folder, a continued run's identity, inputs, device, memory and disk). A launcher that runs jobs elsewhere
    (SLURM) gets only the first two: this machine's device and memory are not the jobs'.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from sae_dist.cli import fail
from sae_dist.config import ConfigError, RunConfig
from sae_dist.data.source import DataUnavailableError
from sae_dist.parallel.mesh import launched_by_torchrun
from sae_dist.run_dir import CheckpointError
from sae_dist.train.run import prepare_run
from sae_dist.validation import to_run_config

LOCAL_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, in the order the basic sweeper runs them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose_job(config: DictConfig, overrides: list[str], num: int) -> RunConfig:
    """Job `num`'s run config, composed and resolved as the launcher will (its run folder's name included)."""
    from hydra.core.global_hydra import GlobalHydra

    job = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    with open_dict(job):
        job.hydra.job.id = num
        job.hydra.job.num = num
    hydra_config = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job)  # the run folder's `${run_stamp:}` reads the job's own overrides
    try:
        return to_run_config(job)
    finally:
        HydraConfig.instance().cfg = hydra_config


def job_names(jobs: list[list[str]]) -> list[str]:
    """Each job named by the overrides that differ between jobs ('sae.k=16 sae.num_experts=4')."""
    varying = {item for job in jobs for item in job if not all(item in other for other in jobs)}
    return [" ".join(item for item in job if item in varying) or " ".join(job) for job in jobs]


class CheckEveryJob(Callback):
    """The Hydra callback of the module docstring. Hydra turns a callback's exceptions into warnings and goes on,
    so a refused sweep ends here: one line, exit status 2 (`cli.fail`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:

        try:
            self.check(config)
        except (ConfigError, DataUnavailableError, CheckpointError) as exc:
            fail(exc)

    def check(self, config: DictConfig) -> None:
        jobs = job_overrides(config)
        names = job_names(jobs)
        runs: list[RunConfig] = []
        folders: dict[str, str] = {}
        for num, overrides in enumerate(jobs):
            try:
                run = compose_job(config, overrides, num)
            except ConfigError as exc:
                raise ConfigError(f"multirun job {num} ({names[num]}): {exc}") from None
            folder = os.path.normpath(os.path.abspath(run.trainer.out_dir))
            if folder in folders:
                raise ConfigError(
                    f"multirun jobs ({folders[folder]}) and ({names[num]}) would share trainer.out_dir="
                    f"{run.trainer.out_dir}: each job needs a run folder of its own (leave trainer.out_dir at its "
                    "default, which names each job's folder after its swept values)"
                )
            folders[folder] = names[num]
            runs.append(run)
        if config.hydra.launcher.get("_target_") != LOCAL_LAUNCHER:
            return

        world = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
        for num, (overrides, run) in enumerate(zip(jobs, runs, strict=True)):
            try:
                prepare_run(run, world, overrides)
            except (ConfigError, DataUnavailableError, CheckpointError) as exc:
                raise ConfigError(f"multirun job {num} ({names[num]}): {exc}") from None
