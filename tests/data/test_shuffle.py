import json

import pytest
import torch

from sae_dist.data.shuffle import BlockShuffleSource


class CountingReader:
    """Blocks of consecutive row ids (column 0 = global row id), of varying sizes, endless."""

    d_model = 2
    sizes = (7, 10, 5)

    def __init__(self) -> None:
        self.block = 0
        self.reads = 0

    def position(self) -> dict:
        return {"block": self.block}

    def seek(self, position: dict) -> None:
        self.block = position["block"]

    def start(self, block: int) -> int:
        return sum(self.sizes[i % len(self.sizes)] for i in range(block))

    def read_block(self) -> torch.Tensor:
        self.reads += 1
        start, size = self.start(self.block), self.sizes[self.block % len(self.sizes)]
        self.block += 1
        ids = torch.arange(start, start + size, dtype=torch.float32)
        return torch.stack([ids, -ids], dim=1)


def test_each_row_once_and_shuffled_within_blocks():
    source = BlockShuffleSource(CountingReader(), seed=0)
    rows = torch.cat([source.next_batch(4) for _ in range(11)])  # 44 rows = two rounds of 7 + 10 + 5
    ids = rows[:, 0].long()
    assert sorted(ids.tolist()) == list(range(44))
    assert not torch.equal(ids, torch.arange(44))
    # Rows leave a block only after all of its rows: blocks are contiguous in the output.
    assert sorted(ids[:7].tolist()) == list(range(7)) and sorted(ids[7:17].tolist()) == list(range(7, 17))


def test_permutation_depends_on_seed_and_rank():
    def first(seed: int, rank: int) -> torch.Tensor:
        return BlockShuffleSource(CountingReader(), seed=seed, rank=rank).next_batch(7)

    assert torch.equal(first(0, 0), first(0, 0))
    assert not torch.equal(first(0, 0), first(1, 0))
    assert not torch.equal(first(0, 0), first(0, 1))


@pytest.mark.parametrize("taken", [0, 3, 7, 9, 17, 22, 30])
def test_resume_is_exact_and_rereads_one_block(taken):
    old = BlockShuffleSource(CountingReader(), seed=5, rank=1)
    if taken:
        old.next_batch(taken)
    state = json.loads(json.dumps(old.state_dict()))
    assert set(state) == {"block_start", "block_index", "offset"}
    reader = CountingReader()
    fresh = BlockShuffleSource(reader, seed=5, rank=1)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    for size in (6, 13, 1):  # batches that span blocks
        assert torch.equal(old.next_batch(size), fresh.next_batch(size))
    assert reader.block - reader.reads == state["block_start"]["block"]  # no block read twice
