"""TritonAdam on the CPU: `triton_adam_interpreted.py` in a process of its own under Triton's interpreter (Triton
chooses it at import, so this process keeps the compiled kernels for the GPU tests)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECKS = Path(__file__).with_name("triton_adam_interpreted.py")
ROOT = Path(__file__).parents[2]


def test_triton_adam_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", str(CHECKS), "-o", "addopts=", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
