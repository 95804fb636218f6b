"""Block shuffle: mixes activations from many units before batching, with exact resume on any world size.

A rank reads the units of its `Plan` (see `order.py`) through a `UnitReader`: `prepare` does the cheap per-unit
work ahead (text: tokenisation, possibly in worker processes) and tells how many rows each unit gives; `fill`
writes the activations of a list of prepared units into a preallocated block on the device (text: LM forwards;
cache: copies from memory-mapped shards), one piece of work at a time. A block is the next units of the plan until
they hold >= `block_rows` rows; its rows are served through a permutation drawn from a generator seeded by
(seed, the block's first unit), which does not depend on the rank or the world size.

Two blocks are held: the one being served and the next one, which `work_ahead` fills piece by piece (the prefetch
thread calls it while its queue is full), so the LM keeps running while the SAE trains on the current block.
The state is the plan with the served block first and its offset; resuming rebuilds that block from its units
(one block of LM forwards or disk reads) and never stores activations.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from sae_dist.data.order import PLAN_KEY, Plan, StartedBlock
from sae_dist.data.source import ActivationSource, derive_seed

PREPARE_STEP_UNITS = 64
"""Units prepared per `work_ahead` call while a block's units are gathered."""

_BLOCK_SEED_SALT = 0x5EED_B10C


class PreparedUnit(NamedTuple):
    unit: int
    rows: int
    payload: Any
    """What `fill` needs to produce the unit's rows (token ids, a shard slice, ...)."""


class UnitReader(Protocol):
    """Turns units into activation rows."""

    d_model: int
    dtype: torch.dtype
    """dtype of the rows in a block (e.g. bfloat16 for a bfloat16 LM); batches are served as float32."""
    device: torch.device

    def prepare(self, units: Iterator[int]) -> Iterator[PreparedUnit]:
        """The units, prepared lazily and in order."""

    def fill(self, prepared: list[PreparedUnit], out_ND: Tensor) -> Iterator[None]:
        """Write the rows of `prepared` (in order, N = their total rows) into `out_ND`, yielding after each piece."""

    def close(self) -> None:
        """Release worker processes and files."""


class Block(NamedTuple):
    units: list[int]
    rows_ND: Tensor
    perm_N: Tensor
    """Row order of the block, on the block's device."""


BlockBuild = Generator[None, None, Block]


class BlockShuffleSource(ActivationSource):
    """Serves batches from consecutive shuffled blocks of this rank's units (module docstring)."""

    def __init__(self, reader: UnitReader, block_rows: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.reader = reader
        self.d_model = reader.d_model
        self.block_rows = block_rows
        self.seed = seed
        self.load_state_dict({PLAN_KEY: Plan.fresh(rank, world_size).to_state()})

    # --- building blocks ----------------------------------------------------------------------------------------
    def _permutation(self, first_unit: int, rows: int) -> Tensor:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _BLOCK_SEED_SALT, first_unit))
        return torch.randperm(rows, generator=gen).to(self.reader.device, non_blocking=True)

    def _materialize(self, prepared: list[PreparedUnit]) -> BlockBuild:
        rows = sum(p.rows for p in prepared)
        out_ND = torch.empty(rows, self.d_model, dtype=self.reader.dtype, device=self.reader.device)
        yield from self.reader.fill(prepared, out_ND)
        return Block([p.unit for p in prepared], out_ND, self._permutation(prepared[0].unit, rows))

    def _build_started(self, started: StartedBlock) -> BlockBuild:
        return (yield from self._materialize(list(self.reader.prepare(iter(started.units)))))

    def _build_fresh(self) -> BlockBuild:
        if self._fresh is None:
            self._fresh = self.reader.prepare(self._after_current.fresh_units())
        prepared: list[PreparedUnit] = []
        rows = 0
        while rows < self.block_rows:
            prepared.append(next(self._fresh))
            rows += prepared[-1].rows
            if len(prepared) % PREPARE_STEP_UNITS == 0:
                yield
        self._next_fresh_units = len(prepared)
        return (yield from self._materialize(prepared))

    def _start_next(self) -> None:
        started = self._after_current.blocks
        self._next_build = self._build_started(started[0]) if started else self._build_fresh()
        self._next_block = None

    def work_ahead(self) -> bool:
        if self._next_block is not None:
            return False
        if self._next_build is None:
            self._start_next()
        try:
            next(self._next_build)
        except StopIteration as done:
            self._next_block, self._next_build = done.value, None
        return True

    def _advance(self) -> None:
        """Make the next block (finished now if need be) the served one."""
        while self.work_ahead():
            pass
        plan = self._after_current
        if plan.blocks:
            offset = plan.blocks[0].offset
            self._after_current = Plan(plan.next, plan.stride, plan.blocks[1:], plan.queue)
        else:
            offset = 0
            self._after_current = plan.after_units(self._next_fresh_units)
        self._current, self._offset, self._next_block = self._next_block, offset, None

    # --- serving -------------------------------------------------------------------------------------------------
    def next_batch(self, batch_size: int) -> Tensor:
        parts = []
        needed = batch_size
        while needed > 0:
            if self._current is None or self._offset == len(self._current.perm_N):
                self._current = None
                self._advance()
            take_B = self._current.perm_N[self._offset : self._offset + needed]
            parts.append(self._current.rows_ND.index_select(0, take_B).float())
            self._offset += len(take_B)
            needed -= len(take_B)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict:
        plan = self._after_current
        served = self._current is not None and self._offset < len(self._current.perm_N)
        current = [StartedBlock(self._current.units, self._offset)] if served else []
        return {PLAN_KEY: Plan(plan.next, plan.stride, current + plan.blocks, plan.queue).to_state()}

    def load_state_dict(self, state: dict) -> None:
        self._after_current = Plan.from_state(state[PLAN_KEY])
        """Everything after the served block: started blocks still to serve, then the fresh units."""
        self._current: Block | None = None
        self._offset = 0
        self._fresh: Iterator[PreparedUnit] | None = None
        self._next_fresh_units = 0
        self._next_build: BlockBuild | None = None
        self._next_block: Block | None = None

    def close(self) -> None:
        self.reader.close()
