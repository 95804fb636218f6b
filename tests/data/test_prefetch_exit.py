"""A prefetching source never closed (a test's trainer, a user's script): its producer is stopped and joined before
the interpreter finalises. One that ended during finalisation, releasing its tensors inside torch, aborted the
process (`terminate called without an active exception`, status 134): seen at the end of test runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_unclosed_producer_has_ended_before_finalisation():
    script = textwrap.dedent("""
        import atexit, threading

        def producers_left():  # registered first, so it runs after the package's exit handler
            alive = [t.name for t in threading.enumerate() if t.name == "activation-prefetch" and t.is_alive()]
            print("producers left at finalisation:", alive)

        atexit.register(producers_left)

        from sae_dist.data.prefetch import PrefetchingSource
        from sae_dist.data.synthetic import SyntheticSource

        source = PrefetchingSource(SyntheticSource(d_model=64, num_features=256, active=8, noise=0.01), depth=4)
        source.next_batch(256)  # the producer now runs ahead; nobody closes the source
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "producers left at finalisation: []", done.stdout
