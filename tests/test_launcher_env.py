"""The default run folder is found again after a torchrun restart or a SLURM requeue (formerly it held the time of
each start, so a restart trained from step 0 in a new folder)."""

import os
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sae_dist import launcher_env
from sae_dist.config import register_configs
from sae_dist.validation import to_run_config

register_configs()

CONF = Path(__file__).resolve().parents[1] / "conf"
LAUNCH_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_slurm_jobs_name_the_folder_by_job_id(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "4242")
    assert launcher_env.run_stamp() == "slurm-4242"
    clean_env.setenv("SLURM_ARRAY_JOB_ID", "77")
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert launcher_env.run_stamp() == "slurm-77_3"
    # The jobs of one sweep (one array) share the array's folder, each in the folder of its swept values.
    assert launcher_env.run_stamp(sweep_job="sae.k=16") == "slurm-77/sae.k=16"


def test_torchrun_workers_share_the_agent_start_time_across_restarts(clean_env):
    """Under torchrun the stamp is the agent's (parent's) start time: the same whenever a worker asks, unlike the
    current time outside torchrun."""
    later = time.time() + 3600
    clean_env.setenv("TORCHELASTIC_RUN_ID", "abc")
    first = launcher_env.run_stamp()
    clean_env.setattr(time, "time", lambda: later)
    assert launcher_env.run_stamp() == first
    clean_env.delenv("TORCHELASTIC_RUN_ID")
    assert launcher_env.run_stamp() == time.strftime(launcher_env.STAMP_FORMAT, time.localtime(later))
    assert launcher_env.run_stamp() != first


def test_process_start_time_is_read_from_proc():
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc on this system")
    started = launcher_env._process_start_time(os.getpid())
    assert started is not None and time.time() - 24 * 3600 < started <= time.time()
    assert launcher_env._process_start_time(2**22 + 1) is None


def test_default_out_dir_uses_the_stamp(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "99")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        run = to_run_config(compose(config_name="config", overrides=["name=demo"]))
    assert run.trainer.out_dir == "runs/demo/slurm-99"
