"""Fault tolerance across ranks: a real torchrun job that is signalled and killed and restarts by itself, and a
2-rank gloo job for what needs ranks to disagree (NaN on one rank, a full disk on one rank, a stalled rank).

Formerly, `torchrun --max-restarts=2` after a killed rank refused to restart ("already holds checkpoints") or, with
trainer.resume=true and the default folder, trained from step 0 in a new folder; a stalled rank left the others
blocked for 30 minutes; NaN under torchrun reached the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_dist.run_dir import latest_checkpoint, read_history
from sae_dist.train import checkpoint as ckpt
from tests.parallel.spawn_harness import spawn_checks
from tests.train.restart_workers import JOB, two_ranks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("restarts")
    return spawn_checks(two_ranks, 2, folder, "two"), folder


@pytest.mark.parametrize(
    "name", ["nan_on_one_rank", "save_fails_on_one_rank", "error_on_one_rank", "sweep_stop_on_one_rank", "stalled_rank"]
)
def test_two_rank_faults(job, name):
    job[0].require(name)


def saved_state(folder: Path) -> dict[str, torch.Tensor]:
    """Weights, Adam state and dead counters of a checkpoint, plus its single-file export."""
    state = ckpt.read_global_state(folder)
    state.update({f"export.{k}": v for k, v in ckpt.read_global_state(folder, "model.").items()})
    return state


def test_torchrun_restarts_resume_by_themselves_and_end_as_an_unbroken_run(job, tmp_path):
    """Attempt 0: SIGTERM to rank 1 during step 7; both ranks stop after step 10 with its checkpoint and exit 75.
    Attempt 1: SIGKILL to rank 0 while saving step 15, after the rename and before `latest` is replaced.
    Attempt 2: resumes from step 10 again and finishes. The default run folder is found again each time, and the
    final weights and Adam state equal the uninterrupted 2-rank run's bit for bit."""
    job[0].require("baseline")
    plan = {"0": {"rank": 1, "signal": "SIGTERM", "step": 7},
            "1": {"rank": 0, "signal": "SIGKILL", "step": 15, "when": "publish"}}
    env = dict(os.environ, FAULT_PLAN=json.dumps(plan), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=2"]
    result = subprocess.run([*torchrun, str(ROOT / "tests" / "train" / "faulty_train.py"), *JOB], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stopped by a stop signal to another rank after step 10" in result.stderr
    exits = [json.loads(line) for line in (tmp_path / "exit_statuses.jsonl").read_text().splitlines()]
    assert sorted(e["rank"] for e in exits if e["attempt"] == 0 and e["status"] == 75) == [0, 1], exits
    run_dirs = list((tmp_path / "runs" / "restart").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    resumes = [event for event in read_history(run_dir) if event["event"] == "resume"]
    assert [event["message"] for event in resumes] == ["resumed from step 10 (tokens 1,280) on 2 ranks"] * 2
    assert result.stdout.count("resumed from step 10 (tokens 1,280) on 2 ranks") == 2
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000015", "step_00000020"]
    baseline = saved_state(latest_checkpoint(job[1] / "baseline"))
    restarted = saved_state(latest_checkpoint(run_dir))
    assert baseline.keys() == restarted.keys()
    for key, tensor in baseline.items():
        assert torch.equal(restarted[key], tensor), key
