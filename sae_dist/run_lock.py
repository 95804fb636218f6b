"""One writer per folder: a run folder (training) or a cache folder (writing activations) is locked while in use.

The lock is the file `FOLDER/.lock`, created with O_CREAT | O_EXCL (atomic on local filesystems and on NFSv3+ and
the parallel filesystems SLURM clusters use), holding JSON {host, pid, started, job}. While held, a daemon thread
touches it every `HEARTBEAT_S` seconds, so its modification time says the holder is alive. A second command on the
folder is refused at once with one line naming the holder (`FolderInUseError`, exit status 2). A lock whose holder
is gone does not block:
  - same host, and the pid no longer runs (or now belongs to a process started after the lock): taken over;
  - a worker of a restarted torchrun job (same TORCHELASTIC_RUN_ID, higher TORCHELASTIC_RESTART_COUNT): taken over,
    since the agent ends every worker of an attempt before it starts the next;
  - any host, heartbeat older than `STALE_S`: taken over;
  - another host, fresh heartbeat, same SLURM job (a requeue racing the previous allocation's teardown): waits up to
    `STALE_S` for the heartbeat to stop, then takes over, or is refused if it never does.
Under torchrun rank 0 alone holds the lock; the launcher tells every rank the outcome before loading anything.

Not covered: filesystems without a working O_EXCL (NFSv2, some FUSE mounts): two commands started within the same
instant may both win; a holder whose host clock is far off (the heartbeat is compared against this host's clock);
a process frozen (SIGSTOP, a suspended VM) for longer than `STALE_S` loses its lock while frozen.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from sae_dist.config import ConfigError
from sae_dist.launcher_env import _process_start_time, slurm_job

LOCK_FILE = ".lock"
HEARTBEAT_S = 10.0
"""Seconds between two touches of the lock file by its holder."""
STALE_S = 60.0
"""A lock file untouched for this long belongs to a holder that is gone (frozen, killed, or on a lost host)."""
_START_SLACK_S = 2.0
"""Clock-tick rounding of /proc start times: a pid whose process started this much after the lock still held it."""
_WRITE_GRACE_S = 2.0
"""A lock file that cannot be read is being written for this long at most; older, its writer was killed."""
_VANISHED: dict = {"vanished": True}
"""The record of a lock file released while it was being looked at."""


class FolderInUseError(ConfigError):
    """Another live process holds the folder's lock; the message names it (host, pid, start time)."""


def _holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "slurm_job": slurm_job(),
        "torchrun": os.environ.get("TORCHELASTIC_RUN_ID"),
        "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }


def _pid_alive(pid: int, locked_at: float) -> bool:
    """Whether `pid` runs on this host and is the process that took the lock (not a later one reusing its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    started = _process_start_time(pid)
    return started is None or started <= locked_at + _START_SLACK_S


def describe(holder: dict) -> str:
    started = datetime.fromtimestamp(float(holder.get("started", 0)), timezone.utc).isoformat(timespec="seconds")
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {started}{job}"


class FolderLock:
    """The lock of one folder (module docstring). `acquire()` creates the folder if needed; `release()` removes
    the lock file, and the folder too when the lock created it and nothing else was written there."""

    def __init__(self, folder: str | os.PathLike, option: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S) -> None:
        self.folder, self.option = Path(folder), option
        self.path = self.folder / LOCK_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._created: list[Path] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking and giving back -----------------------------------------------------------------------------------
    def acquire(self) -> FolderLock:
        self._make_folder()
        wait_until = None
        while not self._try_create():
            holder, age = self._read_holder()
            if holder is _VANISHED or (holder is None and age < _WRITE_GRACE_S):
                time.sleep(0.05)  # released meanwhile, or its holder is writing it: look again
                continue
            if holder is None or self._holder_gone(holder, age):
                self._remove_stale(holder)
                continue
            if self._same_job_elsewhere(holder):
                wait_until = wait_until or time.time() + self.stale_s
                if time.time() < wait_until:
                    time.sleep(min(self.heartbeat_s, 1.0))
                    continue
            self._remove_created_folders()
            raise FolderInUseError(
                f"{self.option}={self.folder} is in use by {describe(holder)} (lock file {self.path}); wait for it "
                f"to end, or choose another {self.option} (a lock whose holder is gone is taken over: at once on "
                f"its host, after {self.stale_s:.0f} s without a heartbeat elsewhere)"
            )
        self._thread = threading.Thread(target=self._beat, name="folder-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._remove_if_ours()
        self._remove_created_folders()

    def _remove_created_folders(self) -> None:
        """Remove the folders this lock created, if they are empty (a refused or failed command leaves none)."""
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # --- details ----------------------------------------------------------------------------------------------------
    def _make_folder(self) -> None:
        missing = []
        folder = self.folder.absolute()
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = list(reversed(missing))

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        self._record = _holder_record()
        with os.fdopen(fd, "w") as f:
            json.dump(self._record, f)
        return True

    def _read_holder(self) -> tuple[dict | None, float]:
        """(the holder's record, seconds since its last heartbeat); the record is `_VANISHED` for a lock file
        released meanwhile, None for one that cannot be read (being written, or its writer killed)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return _VANISHED, 0.0
        except (OSError, ValueError):
            return None, age
        return (holder if isinstance(holder, dict) else None), age

    def _holder_gone(self, holder: dict, age: float) -> bool:
        if age > self.stale_s:
            return True
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if run_id is not None and holder.get("torchrun") == run_id and int(holder.get("attempt", 0)) < attempt:
            return True
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", -1)), float(holder.get("started", 0)))
        return False

    def _same_job_elsewhere(self, holder: dict) -> bool:
        job = slurm_job()
        return job is not None and holder.get("slurm_job") == job and holder.get("host") != socket.gethostname()

    def _remove_stale(self, holder: dict | None) -> None:
        """Remove a dead holder's lock file, unless another taker replaced it since it was read."""
        try:
            current = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            current = None
        if current == holder:
            self.path.unlink(missing_ok=True)

    def _remove_if_ours(self) -> None:
        try:
            ours = json.loads(self.path.read_text()) == self._record
        except (OSError, ValueError):
            return
        if ours:
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # the folder was removed under us: nothing left to guard
                return
