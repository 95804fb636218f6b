"""The order in which ranks read their data, and the rule that keeps it exact across a change of world size.

Data is a sequence of *units* with global ids 0, 1, 2, ...: for text a unit is one document of the endless
concatenation of epochs (unit g is document g mod n); for a cache it is a chunk of rows (see `cache.py`). Every
unit is read by exactly one rank, which turns a run of its units into one shuffle block.

A rank's `Plan` is what it still has to read, in this order:
  blocks          shuffle blocks already started, each a list of units and `offset`, the rows of its
                  permutation already consumed (the first is the block being served);
  queue           single units owed to this rank, ascending;
  next, stride    then units next, next + stride, next + 2 * stride, ... for ever.
A fresh run on W ranks gives rank r the plan (no blocks, empty queue, next = r, stride = W). Everything before a
rank's plan has been consumed; a saved position is the plan, so it never holds activations.

Resuming states saved by W ranks on W' ranks (`resume_state`):
  - W' == W: rank r continues its own plan, so the continuation equals the uninterrupted run bit for bit.
  - otherwise let F be the largest `next` of the saved plans; every unit >= F is unread by every old rank.
    The owed units below F are the union of the queues and, for each saved plan, next, next + stride, ... < F.
    Started blocks (old rank order) go to new rank i mod W'; owed units (ascending) go to new rank j mod W';
    new rank r' then continues with the units >= F that are congruent to r' mod W', stride W'.
  Every unread row lands on exactly one new rank: a resumed run neither repeats nor skips a document or a row.
  Started blocks are rebuilt from their units with the same permutation and served from `offset`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

PLAN_KEY = "plan"
"""The key of a plan in a source's state dict (marks a state that `resume_state` redistributes)."""


def to_ranges(values: Iterable[int]) -> list[list[int]]:
    """Ascending or not, consecutive equal steps folded: [0, 2, 4, 5] -> [[0, 5, 2], [5, 6, 1]] (start, stop, step)."""
    runs: list[list[int]] = []
    for value in values:
        if runs:
            start, stop, step = runs[-1]
            count = len(range(start, stop, step))
            if count == 1 and value != start:
                runs[-1] = [start, value + (value - start), value - start]
                continue
            if count > 1 and value == stop:
                runs[-1][1] = stop + step
                continue
        runs.append([value, value + 1, 1])
    return runs


def from_ranges(runs: Iterable[Iterable[int]]) -> list[int]:
    return [value for start, stop, step in runs for value in range(start, stop, step)]


@dataclass
class StartedBlock:
    """A shuffle block whose first `offset` rows (in permuted order) have been consumed."""

    units: list[int]
    offset: int = 0


@dataclass
class Plan:
    """What one rank still has to read (see the module docstring)."""

    next: int
    stride: int
    blocks: list[StartedBlock] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)

    @classmethod
    def fresh(cls, rank: int, world_size: int) -> Plan:
        return cls(next=rank, stride=world_size)

    def fresh_units(self) -> Iterator[int]:
        """The units after the started blocks, in order, for ever."""
        return itertools.chain(self.queue, itertools.count(self.next, self.stride))

    def after_units(self, taken: int) -> Plan:
        """This plan without its started blocks and the first `taken` fresh units."""
        in_queue = min(taken, len(self.queue))
        return Plan(self.next + (taken - in_queue) * self.stride, self.stride, [], self.queue[in_queue:])

    def owed_below(self, bound: int) -> list[int]:
        """The fresh units below `bound`."""
        return [u for u in self.queue if u < bound] + list(range(self.next, max(bound, self.next), self.stride))

    def to_state(self) -> dict:
        """JSON-able; units stored as (start, stop, step) runs, so progressions stay small."""
        blocks = [{"units": to_ranges(b.units), "offset": b.offset} for b in self.blocks]
        return {"next": self.next, "stride": self.stride, "blocks": blocks, "queue": to_ranges(self.queue)}

    @classmethod
    def from_state(cls, state: dict) -> Plan:
        blocks = [StartedBlock(from_ranges(b["units"]), int(b["offset"])) for b in state["blocks"]]
        return cls(int(state["next"]), int(state["stride"]), blocks, from_ranges(state["queue"]))


def redistribute(plans: list[Plan], world_size: int) -> list[Plan]:
    """The plans of `world_size` ranks that together read exactly what `plans` still had to read."""
    if len(plans) == world_size:
        return plans
    frontier = max(plan.next for plan in plans)
    owed = sorted(u for plan in plans for u in plan.owed_below(frontier))
    started = [block for plan in plans for block in plan.blocks]
    return [
        Plan(
            next=frontier + (rank - frontier) % world_size,
            stride=world_size,
            blocks=started[rank::world_size],
            queue=owed[rank::world_size],
        )
        for rank in range(world_size)
    ]


def units_begun(plans: list[Plan]) -> int:
    """How many units the ranks of `plans` (one run's, from a fresh start) have begun reading: every unit below the
    frontier that no plan still owes (the units of started blocks are begun). For text, the documents a cache
    holds rows of (its last blocks' documents in part)."""
    frontier = max(plan.next for plan in plans)
    return frontier - sum(len(plan.owed_below(frontier)) for plan in plans)


def resume_state(saved: list[dict], rank: int, world_size: int) -> dict:
    """This rank's data state from the states saved by every rank of a run on len(saved) ranks.

    States holding a plan are redistributed exactly (module docstring); any other state (a counter, e.g. the
    synthetic source) is taken from the saved rank `rank mod len(saved)`.
    """
    own = saved[rank % len(saved)]
    if PLAN_KEY not in own or len(saved) == world_size:
        return own
    plans = redistribute([Plan.from_state(state[PLAN_KEY]) for state in saved], world_size)
    return {**own, PLAN_KEY: plans[rank].to_state()}
