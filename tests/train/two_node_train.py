"""launch/train.py on one global synthetic stream, for the multi-node test: `torchrun ... two_node_train.py OVERRIDES`.

Every rank reads its rows of one global stream (`ep_helpers.GlobalBatchSource`), so a run on any number of ranks
and nodes sees the batches that one process sees concatenated; faults and exit statuses as in faulty_train.py."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import sae_dist.train.plan
from tests.parallel.ep_helpers import GlobalBatchSource

ROOT = Path(__file__).resolve().parents[2]


def global_stream(run, rank=0, world_size=1, device="cpu", sites=None):
    return GlobalBatchSource(run, rank, world_size)


if __name__ == "__main__":
    sae_dist.train.plan.build_activation_source = global_stream
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runpy.run_path(str(ROOT / "tests" / "train" / "faulty_train.py"), run_name="__main__")
