"""`request_stop`, the parent watch's stop: a recorded request during a run, the end of the process before one, and
nothing once a run has stopped on request (formerly a SIGTERM that killed the stopping process mid-exit, its
status 75 lost: seen on rank 0 of a job whose other rank noticed the dead agent first)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRELUDE = """
import sys, threading
from pathlib import Path
from sae_dist.train.preemption import StopRequested, StopSignals, request_stop

def from_a_thread():
    thread = threading.Thread(target=request_stop)
    thread.start()
    thread.join()
"""


def run_script(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_a_request_during_a_run_is_recorded_and_one_after_a_stop_does_nothing():
    done = run_script("""
        with StopSignals() as signals:
            from_a_thread()
            for _ in range(1000):  # the handler runs in the main thread, between two bytecodes
                if signals.received:
                    break
        assert signals.received == "SIGTERM", signals.received
        try:
            with StopSignals():
                raise StopRequested("SIGUSR1", 5, None, out_dir=Path("run"))
        except StopRequested:
            pass
        from_a_thread()
        print("alive")
        sys.exit(75)
    """)
    assert (done.returncode, done.stdout) == (75, "alive\n"), done.stderr[-2000:]


def test_a_request_before_any_run_ends_the_process():
    done = run_script("""
        from_a_thread()
        import time
        time.sleep(30)
    """)
    assert done.returncode == -signal.SIGTERM, (done.returncode, done.stderr[-2000:])
