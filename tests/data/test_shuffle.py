import json

import pytest
import torch
from unit_readers import id_source, row_ids, unit_rows


def block_units(source) -> list[int]:
    return source._current.units


def test_blocks_hold_whole_units_of_at_least_block_rows_each_row_once_shuffled():
    source = id_source(block_rows=12)
    rows = row_ids(source.next_batch(1))
    units = block_units(source)
    block = {(u, j) for u in units for j in range(unit_rows(u))}
    assert len(block) >= 12 and len(block) - unit_rows(units[-1]) < 12
    rows += row_ids(source.next_batch(len(block) - 1))
    assert set(rows) == block and rows != sorted(rows)  # the block's rows, all of them, shuffled
    rows += [r for _ in range(30) for r in row_ids(source.next_batch(7))]
    assert len(set(rows)) == len(rows)
    read = {u for u, _ in rows}
    assert {(u, j) for u in range(max(read) - 10) for j in range(unit_rows(u))} <= set(rows)


def test_permutation_depends_on_the_seed_and_the_block_not_on_the_rank():
    def first_block(seed: int, rank: int, world: int):
        source = id_source(rank, world, seed=seed)
        batch = source.next_batch(12)
        return block_units(source), batch

    units_a, rows_a = first_block(seed=0, rank=0, world=1)
    units_b, rows_b = first_block(seed=0, rank=1, world=2)
    assert units_a != units_b and not torch.equal(rows_a, rows_b)
    # The block of units 1, 3, 5 ... read by rank 1 of 2 shuffles the same way whoever reads it.
    same = id_source(rank=1, world_size=2, seed=0)
    assert torch.equal(same.next_batch(12), rows_b)
    assert not torch.equal(first_block(seed=1, rank=1, world=2)[1], rows_b)


@pytest.mark.parametrize("taken", [0, 3, 12, 17, 40])
def test_resume_is_exact_and_rereads_only_the_started_block(taken):
    old = id_source(rank=1, world_size=2, seed=5)
    if taken:
        old.next_batch(taken)
    state = json.loads(json.dumps(old.state_dict()))
    fresh = id_source(rank=1, world_size=2, seed=5)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    for size in (6, 13, 1, 30):  # batches that span blocks
        assert torch.equal(old.next_batch(size), fresh.next_batch(size))
    started = state["plan"]["blocks"]
    assert max(fresh.reader.filled.values()) == 1
    if started:
        assert min(fresh.reader.filled) == started[0]["units"][0][0]


def test_working_ahead_changes_neither_batches_nor_state():
    plain, eager = id_source(seed=2), id_source(seed=2)
    for size in (5, 9, 1, 14, 3):
        state = eager.state_dict()
        while eager.work_ahead():
            assert eager.state_dict() == state
        assert torch.equal(plain.next_batch(size), eager.next_batch(size))
    assert max(eager.reader.filled.values()) == 1
