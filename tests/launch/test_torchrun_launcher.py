"""launch/torchrun.py: torchrun's agent with a one-line failure that keeps the workers' exit status."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.torchrun import exit_status
from sae_dist.run_dir import latest_checkpoint, verify_files

ROOT = Path(__file__).resolve().parents[2]


def test_bad_input_under_the_launcher_is_one_line_and_status_2(tmp_path):
    """torchrun itself prints a ~40-line ChildFailedError traceback and exits 1; the launcher exits 2, the workers'
    status, with the workers' line and one line of its own."""
    command = [sys.executable, "launch/torchrun.py", "--nproc_per_node=2", "launch/train.py", "data=synthetic",
               "sae.k=0", f"trainer.out_dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith("error: sae.k=0") for line in lines), done.stderr
    # both ranks refuse the option; which one the agent sees fail first is a race
    assert re.fullmatch(r"torchrun: launch/train.py failed on rank [01] first, exit status 2 \(its lines above say "
                        r"why\)", lines[-1]), lines[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("exitcode", "status"), [(2, 2), (65, 65), (75, 75), (-9, 137), (-15, 143)])
def test_a_signal_is_reported_as_a_shell_reports_it(exitcode, status):
    assert exit_status(exitcode) == status


def test_a_stop_signal_to_the_launcher_checkpoints_and_ends_in_one_line_with_status_75(tmp_path):
    """SIGUSR1 to the agent, as the SLURM scripts forward a time limit's warning: torchrun hands it to the workers,
    which write a checkpoint and stop, then ends with its SignalException traceback and status 1; the launcher ends
    with one line and 75, the status the scripts and `trainer.resume=auto` continue from."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "launch/torchrun.py", "--standalone", "--nproc-per-node=2", "--max-restarts=3",
               "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=60",
               "launch/train.py", "data=synthetic", "data.d_model=32", "sae.num_latents=256", "sae.num_experts=4",
               "sae.k=4", "trainer.batch_size=128", "trainer.steps=1000000", "trainer.log_every=5",
               "trainer.progress=false", "trainer.tensorboard=false", f"trainer.out_dir={run_dir}"]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    lines = err.splitlines()
    assert lines[-1] == ("torchrun: stopped by SIGUSR1, which the workers were handed to write a checkpoint and stop "
                         "(their lines above say whether they did); the same command continues the run")
    assert any(line.startswith("stopped by SIGUSR1 after step") for line in lines), err[-3000:]
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    verify_files(checkpoint)
