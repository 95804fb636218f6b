"""A cache job ends when its rows are written: its prefetch producer makes the job's batches, of one size, and no
more. Before, the job idled about 85 s after its bar reached 100 %: the producer was computing a batch nobody
would take (and a smaller last shard stopped and rewound it, recomputing the block being served)."""

from __future__ import annotations

import time

import torch

from sae_dist.data.cache_writer import BatchBudget, FullBatches, batches_left, write_shards
from sae_dist.data.prefetch import PrefetchingSource
from sae_dist.data.source import ActivationSource

SLOW_S = 0.4


class SlowStream(ActivationSource):
    """Consecutive rows 0, 1, 2, ... of one stream, each batch taking SLOW_S seconds (an LM forward)."""

    def __init__(self) -> None:
        self.d_model, self.row, self.batches = 4, 0, 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        time.sleep(SLOW_S)
        self.batches += 1
        rows = torch.arange(self.row, self.row + batch_size, dtype=torch.float32)
        self.row += batch_size
        return rows[:, None].expand(-1, self.d_model).contiguous()

    def state_dict(self) -> dict:
        return {"row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.row = state["row"]


def test_the_producer_makes_the_jobs_batches_and_no_more(tmp_path):
    num_tokens, shard = 250, 100  # shards of 100, 100 and 50 rows
    stream = SlowStream()
    assert batches_left(tmp_path, num_tokens, shard, 0, 1) == 3
    source = FullBatches(PrefetchingSource(BatchBudget(stream, 3), depth=4), shard)
    start = time.perf_counter()
    entries = write_shards(source, tmp_path, num_tokens, shard)
    source.close()
    elapsed = time.perf_counter() - start
    assert [e["rows"] for e in entries] == [100, 100, 50]
    assert stream.batches == 3, "the producer computed a batch nobody takes, or recomputed one after a rewind"
    assert elapsed < 3 * SLOW_S + 1.0, elapsed
    from safetensors.torch import load_file

    rows = torch.cat([load_file(str(tmp_path / e["file"]))["activations"][:, 0] for e in entries])
    assert torch.equal(rows, torch.arange(250, dtype=torch.float32)), "the cut batch is not the stream's next rows"
