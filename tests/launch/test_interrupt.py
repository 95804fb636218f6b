"""Ctrl-C (SIGINT): one line and exit status 130, not a 50-line KeyboardInterrupt traceback. Training names the
checkpoint the same command continues from; its checkpoints and its folder are left as a crash leaves them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_dist.cli import INTERRUPTED_EXIT_STATUS, one_line_errors
from sae_dist.run_dir import latest_checkpoint, verify_files
from sae_dist.run_lock import LOCK_FILE

ROOT = Path(__file__).resolve().parents[2]


def test_ctrl_c_in_training_is_one_line_naming_the_checkpoint_to_continue_from(tmp_path):
    run = tmp_path / "run"
    # A shell's Ctrl-C reaches a foreground job, whose SIGINT raises KeyboardInterrupt (even where this test's own
    # SIGINT is ignored, as in a job started in the background).
    as_foreground = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    command = [sys.executable, "-c", as_foreground, str(ROOT / "launch" / "train.py"), "data=synthetic",
               "sae.num_latents=512", "sae.num_experts=4", "sae.k=8", "trainer.batch_size=64",
               "trainer.steps=1000000", "trainer.checkpoint_every=20", "trainer.progress=false",
               "trainer.tensorboard=false", f"trainer.out_dir={run}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(run) is None:
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.2)
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    latest = latest_checkpoint(run)
    assert job.returncode == INTERRUPTED_EXIT_STATUS, err[-3000:]
    assert err.splitlines() == [(
        f"interrupted by SIGINT; the steps after the run's latest checkpoint, {latest}, are lost; the same command "
        f"with trainer.out_dir={run} continues the run from it")]
    verify_files(latest)  # the checkpoint named is whole
    assert not (run / LOCK_FILE).exists(), "the folder's lock was left behind"


def test_ctrl_c_in_any_command_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        raise KeyboardInterrupt
    assert exit_info.value.code == INTERRUPTED_EXIT_STATUS
    assert capsys.readouterr().err == "interrupted by SIGINT\n"
