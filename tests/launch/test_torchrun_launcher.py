"""launch/torchrun.py: torchrun's agent with a one-line failure that keeps the workers' exit status."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.torchrun import exit_status

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
