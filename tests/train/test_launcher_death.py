"""Workers never outlive their launcher: a real torchrun job whose agent dies mid-run.

Before, the workers of a killed agent (SIGKILL, or SIGUSR1 to a torchrun without --signals-to-handle) were
re-parented and trained on to the end, orphaned, holding the run folder. Now each worker notices its parent is gone
(`sae_dist.parent_watch`), stops after a checkpoint (exit status 75) and releases the run folder's lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_dist.run_dir import latest_checkpoint, read_metrics
from sae_dist.run_lock import LOCK_FILE

ROOT = Path(__file__).resolve().parents[2]
LONG_RUN = ["data=synthetic", "sae.num_latents=512", "sae.num_experts=4", "sae.k=8", "trainer.batch_size=64",
            "trainer.steps=1000000", "trainer.log_every=5", "trainer.checkpoint_every=1000000",
            "data.shuffle_buffer=512", "trainer.progress=false", "trainer.tensorboard=false", "parallel.timeout_s=30"]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR1], ids=["SIGKILL", "SIGUSR1"])
def test_workers_stop_after_a_checkpoint_when_their_agent_is_killed(tmp_path, sig):
    """SIGKILL, and SIGUSR1, which a torchrun without --signals-to-handle does not handle: it dies of it."""
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(tmp_path / "out.txt", "w") as out:
        agent = subprocess.Popen([*torchrun, str(ROOT / "tests" / "train" / "faulty_train.py"), *LONG_RUN,
                                  f"trainer.out_dir={run}"], cwd=tmp_path, env=env, stdout=out, stderr=out,
                                 start_new_session=True)
    workers: list[int] = []
    try:
        wait_for(lambda: len(read_metrics(run)) >= 2 or agent.poll() is not None, 240, "training to start")
        assert agent.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
        workers = children(agent.pid)
        assert len(workers) == 2, workers
        agent.send_signal(sig)
        assert agent.wait() == -sig
        killed_at = time.monotonic()
        wait_for(lambda: not any(alive(pid) for pid in workers), 90, "the orphaned workers to end")
        ended_s = time.monotonic() - killed_at
    finally:
        for pid in [agent.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "out.txt").read_text()
    exits = [json.loads(line) for line in (tmp_path / "exit_statuses.jsonl").read_text().splitlines()]
    assert sorted((e["rank"], e["status"]) for e in exits) == [(0, 75), (1, 75)], (exits, log[-3000:])
    assert "error: the launcher (pid" in log and "stopped by " in log, log[-3000:]
    step = int(latest_checkpoint(run).name.removeprefix("step_"))
    assert step >= 5 and step % 5 == 0, step  # the ranks agree to stop at a logging step
    assert not (run / LOCK_FILE).exists(), "rank 0 left its lock behind"
    assert ended_s < 60, ended_s
