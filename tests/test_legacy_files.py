"""Files written by an earlier version keep working: a run folder and an activation cache written by sae-dist at
commit 3025d00 (`tests/fixtures/legacy_3025d00`: a Switch SAE, M = 32, N = 2, k = 4, trained 4 steps on a 256-row
MiniLM block-3 cache) resume, load and export with today's code.

The fixture's `expected_step_00000006.safetensors` is what that version wrote when it continued the run to step 6;
today's code continuing the same checkpoint must reach the same weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae_dist import load_sae

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "legacy_3025d00"


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_an_old_run_resumes_loads_and_exports(tmp_path):
    shutil.copytree(FIXTURE / "cache", tmp_path / "cache")
    shutil.copytree(FIXTURE / "run", tmp_path / "run")

    old = load_sae(tmp_path / "run")
    x_TD = load_file(FIXTURE / "cache" / "shard_00000_000000.safetensors")
    x_TD = next(iter(x_TD.values()))[:16].float()
    assert old(x_TD).x_hat_TD.shape == x_TD.shape

    done = _run(tmp_path, str(ROOT / "launch" / "train.py"), "trainer.out_dir=run", "trainer.steps=6")
    assert "resumed from step 4" in done.stdout
    continued = load_file(tmp_path / "run" / "checkpoints" / "step_00000006" / "model.safetensors")
    expected = load_file(FIXTURE / "expected_step_00000006.safetensors")
    assert continued.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(continued[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    _run(tmp_path, str(ROOT / "launch" / "export.py"), "run", "--format", "saelens", "--out", "exported")
    assert (tmp_path / "exported" / "cfg.json").is_file()
    assert (tmp_path / "exported" / "sae_weights.safetensors").is_file()
