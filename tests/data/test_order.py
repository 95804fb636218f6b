import json
from collections import Counter

import pytest
import torch
from unit_readers import id_source, row_ids, unit_rows

from sae_dist.data.order import Plan, StartedBlock, from_ranges, redistribute, resume_state, to_ranges, units_begun


@pytest.mark.parametrize(
    "values", [[], [3], [0, 2, 4, 5], [9, 6, 3, 0, 1], [1, 1, 2], list(range(0, 1000, 7)) + [1001, 1002]]
)
def test_ranges_round_trip(values):
    assert from_ranges(json.loads(json.dumps(to_ranges(values)))) == values


def test_a_progression_is_one_range():
    assert to_ranges(range(5, 5000, 8)) == [[5, 5005, 8]]


def test_fresh_plans_share_out_every_unit_once():
    plans = [Plan.fresh(rank, 3) for rank in range(3)]
    firsts = sorted(u for plan in plans for u, _ in zip(plan.fresh_units(), range(10)))
    assert firsts == list(range(30))


def test_redistribution_of_hand_made_plans():
    old = [
        Plan(next=8, stride=2, blocks=[StartedBlock([0, 2], 3)]),  # rank 0 has read 4 and 6
        Plan(next=3, stride=2, blocks=[StartedBlock([1], 1)], queue=[]),  # rank 1 is behind
    ]
    new = redistribute(old, 3)
    assert [p.blocks for p in new] == [[StartedBlock([0, 2], 3)], [StartedBlock([1], 1)], []]
    assert [p.queue for p in new] == [[3], [5], [7]]  # owed below the frontier 8: 3, 5, 7 of old rank 1
    assert [(p.next, p.stride) for p in new] == [(9, 3), (10, 3), (8, 3)]
    assert redistribute(old, 2) is old


def consume(sources, batches: int, size: int, seen: Counter) -> None:
    for _ in range(batches):
        for source in sources:
            seen.update(row_ids(source.next_batch(size)))


def resumed(sources, world_size: int, seed: int = 0):
    saved = [json.loads(json.dumps(s.state_dict())) for s in sources]
    fresh = [id_source(rank, world_size, seed=seed) for rank in range(world_size)]
    for rank, source in enumerate(fresh):
        source.load_state_dict(resume_state(saved, rank, world_size))
    return fresh


@pytest.mark.parametrize("worlds", [(2, 3, 1), (3, 1, 2), (4, 2, 1)])
def test_changing_world_size_neither_repeats_nor_skips_a_row(worlds):
    seen: Counter = Counter()
    sources = [id_source(rank, worlds[0]) for rank in range(worlds[0])]
    consume(sources, 7, 5, seen)
    for world in worlds[1:]:
        sources = resumed(sources, world)
        consume(sources, 6, 4, seen)
    # The last layout has one rank: reading on until it is past unit 200 must cover every row below it exactly once.
    last = sources[0] if len(sources) == 1 else resumed(sources, 1)[0]

    def owes_below_200(plan: Plan) -> bool:
        return plan.next <= 200 or bool(plan.queue) or any(min(b.units) < 200 for b in plan.blocks)

    while owes_below_200(Plan.from_state(last.state_dict()["plan"])):
        seen.update(row_ids(last.next_batch(16)))
    assert max(seen.values()) == 1
    expected = {(u, j) for u in range(200) for j in range(unit_rows(u))}
    assert expected <= set(seen)


def test_same_world_size_continues_bit_for_bit():
    sources = [id_source(rank, 2, seed=4) for rank in range(2)]
    consume(sources, 3, 7, Counter())
    again = resumed(sources, 2, seed=4)
    for old, new in zip(sources, again, strict=True):
        for size in (7, 13, 1):
            assert torch.equal(old.next_batch(size), new.next_batch(size))


def test_states_without_a_plan_are_taken_from_rank_mod_w():
    saved = [{"batch": 3}, {"batch": 5}]
    assert [resume_state(saved, rank, 3) for rank in range(3)] == [{"batch": 3}, {"batch": 5}, {"batch": 3}]


def test_units_begun_counts_what_no_plan_still_owes():
    # Two ranks: rank 0 read 0, 2, 4 (next 6); rank 1 read 1 and started a block of 3 and 5 (next 7); a queue unit
    # below the frontier is owed, not begun.
    plans = [Plan(next=6, stride=2, queue=[]), Plan(next=7, stride=2, blocks=[StartedBlock([3, 5], 10)], queue=[])]
    assert units_begun(plans) == 6
    assert units_begun([Plan(next=6, stride=2), Plan(next=3, stride=2)]) == 4, "units 3 and 5 are still owed"
    assert units_begun([Plan(next=9, stride=1, queue=[4])]) == 8
    assert units_begun([Plan.fresh(0, 1)]) == 0
