"""A fake `UnitReader` whose rows say where they came from, for the order and shuffle tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

from sae_dist.data.shuffle import BlockShuffleSource, PreparedUnit


def unit_rows(unit: int) -> int:
    """0 to 5 rows, some units empty."""
    return (unit * 7) % 6


class IdReader:
    """Unit g gives rows [g, 0], [g, 1], ... [g, unit_rows(g) - 1]; counts how often each unit is filled."""

    d_model = 2
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.filled: Counter[int] = Counter()

    def prepare(self, units: Iterator[int]) -> Iterator[PreparedUnit]:
        for unit in units:
            yield PreparedUnit(unit, unit_rows(unit), None)

    def fill(self, prepared: list[PreparedUnit], out_ND: torch.Tensor) -> Iterator[None]:
        row = 0
        for p in prepared:
            self.filled[p.unit] += 1
            out_ND[row : row + p.rows, 0] = p.unit
            out_ND[row : row + p.rows, 1] = torch.arange(p.rows, dtype=torch.float32)
            row += p.rows
            yield

    def close(self) -> None:
        pass


def id_source(rank: int = 0, world_size: int = 1, block_rows: int = 12, seed: int = 0) -> BlockShuffleSource:
    return BlockShuffleSource(IdReader(), block_rows, seed, rank, world_size)


def row_ids(batch: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(u), int(j)) for u, j in batch.tolist()]
