"""The folder lock: a live holder refuses a second taker with one line naming it; a holder that is gone does not.

Before the lock, the same training command started twice on one folder ran twice: the second resumed from the
first's checkpoint while the first was still training, and both exited 0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sae_dist.run_lock import LOCK_FILE, FolderInUseError, FolderLock

HOLD = "import sys, time; from sae_dist.run_lock import FolderLock; FolderLock(sys.argv[1], 'x').acquire(); " \
       "print('held', flush=True); time.sleep(60)"


def plant(folder, age_s: float = 0.0, **record) -> None:
    """A lock file as another holder left it, last touched `age_s` seconds ago."""
    folder.mkdir(parents=True, exist_ok=True)
    values = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "slurm_job": None,
              "torchrun": None, "attempt": 0}
    values.update(record)
    (folder / LOCK_FILE).write_text(json.dumps(values))
    then = time.time() - age_s
    os.utime(folder / LOCK_FILE, (then, then))


def test_a_live_holder_refuses_a_second_taker_naming_it(tmp_path):
    """A real second process holds the folder; this one is refused with one line naming host, pid and start."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError) as info:
            FolderLock(tmp_path / "run", "trainer.out_dir").acquire()
        message = str(info.value)
        assert "\n" not in message and f"pid {holder.pid} on host {socket.gethostname()} since 20" in message
        assert message.startswith(f"trainer.out_dir={tmp_path / 'run'} is in use by ")
    finally:
        holder.kill()
        holder.wait()
    # Killed without releasing: its pid is gone on this host, so the lock is taken over at once.
    with FolderLock(tmp_path / "run", "trainer.out_dir") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert list((tmp_path / "run").iterdir()) == [], "the lock file outlived its release"


def test_a_refused_or_failed_command_leaves_no_folder_behind(tmp_path):
    """The lock creates the folder it guards; released with nothing else written, it removes what it created."""
    with FolderLock(tmp_path / "runs" / "a" / "b", "trainer.out_dir"):
        assert (tmp_path / "runs" / "a" / "b" / LOCK_FILE).is_file()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "record, age_s, taken",
    [
        ({"pid": 2**22 + 12345}, 0, True),  # no such process on this host
        ({"started": 0.0}, 0, True),  # the pid now belongs to a process started after the lock: a reused pid
        ({"host": "elsewhere"}, 0, False),  # another host, heartbeat fresh: its holder may be alive
        ({"host": "elsewhere"}, 120, True),  # another host, heartbeat stopped 2 minutes ago
        ({"host": "elsewhere", "torchrun": "job-1", "attempt": 0}, 0, True),  # an earlier torchrun attempt's rank 0
        ({"host": "elsewhere", "torchrun": "job-1", "attempt": 1}, 0, False),  # this attempt's: not ours to take
    ],
)
def test_who_holds_the_lock(tmp_path, monkeypatch, record, age_s, taken):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    plant(tmp_path, age_s, **record)
    lock = FolderLock(tmp_path, "trainer.out_dir")
    if taken:
        lock.acquire()
        lock.release()
        assert not (tmp_path / LOCK_FILE).exists()
    else:
        with pytest.raises(FolderInUseError, match="is in use by pid .* on host elsewhere"):
            lock.acquire()
        assert (tmp_path / LOCK_FILE).exists(), "a refused taker removed the holder's lock"


def test_a_requeue_waits_for_its_previous_allocation_to_stop_beating(tmp_path, monkeypatch):
    """Same SLURM job on another host, heartbeat fresh: wait (up to the stale time), then take over."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    plant(tmp_path, age_s=0, host="elsewhere", slurm_job="77")
    start = time.monotonic()
    with FolderLock(tmp_path, "trainer.out_dir", stale_s=1.5):
        assert 1.0 < time.monotonic() - start < 10


def test_the_holder_beats_and_an_unreadable_lock_is_taken(tmp_path):
    """A lock file that cannot be read, seconds old (its writer killed between creating and writing it)."""
    (tmp_path / LOCK_FILE).write_bytes(b"\xff half written")
    os.utime(tmp_path / LOCK_FILE, (time.time() - 5, time.time() - 5))
    with FolderLock(tmp_path, "trainer.out_dir", heartbeat_s=0.05) as lock:
        first = lock.path.stat().st_mtime_ns
        time.sleep(0.5)
        assert lock.path.stat().st_mtime_ns > first, "no heartbeat"
    assert not (tmp_path / LOCK_FILE).exists()
