"""Block shuffle: mixes activations from many contexts before batching, with exact and cheap resume.

A `BlockReader` turns a seekable stream (text through a language model, or an on-disk cache) into consecutive
blocks of at least `shuffle_buffer` activations. `BlockShuffleSource` holds one block, draws a permutation of
its rows from a generator seeded by (seed, rank, block index), and serves batches as consecutive slices of that
permutation; a batch that runs past the end of a block continues in the next one.

The state is three small items: the reader's position at the start of the current block (for text: epoch,
documents consumed, contexts consumed of the current document), the block index and the offset in the block.
`load_state_dict` seeks the reader back to the block start and rebuilds the same block and permutation on the
next `next_batch`: resuming costs one block fill (one block of LM forwards, or one read from disk) and a
checkpoint never stores activations. Batches are gathered through the permutation, so the block is never
copied in permuted order (a 2^18 x 768 float32 block is 0.8 GB).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from sae_dist.data.source import ActivationSource, derive_seed


class BlockReader(Protocol):
    """A stream of activation blocks whose position can be saved and restored."""

    d_model: int

    def position(self) -> dict:
        """Where the next `read_block` starts: JSON-able ints and lists."""

    def seek(self, position: dict) -> None:
        """Make the next `read_block` start at `position`."""

    def read_block(self) -> Tensor:
        """The next block of activations, float32 [n, d_model] on CPU, n > 0."""


class BlockShuffleSource(ActivationSource):
    """Serves batches from consecutive blocks of `reader`, each shuffled by a permutation seeded by
    (seed, rank, block index)."""

    def __init__(self, reader: BlockReader, seed: int = 0, rank: int = 0) -> None:
        self.reader = reader
        self.d_model = reader.d_model
        self.seed = seed
        self.rank = rank
        self._block_index = 0
        self._offset = 0
        self._block_start = reader.position()
        self._block_ND: Tensor | None = None
        self._perm_N: Tensor | None = None

    def _fill(self) -> None:
        self._block_start = self.reader.position()
        self._block_ND = self.reader.read_block()
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, self._block_index))
        self._perm_N = torch.randperm(len(self._block_ND), generator=gen)

    def next_batch(self, batch_size: int) -> Tensor:
        parts = []
        needed = batch_size
        while needed > 0:
            if self._block_ND is None:
                self._fill()
            take = self._perm_N[self._offset : self._offset + needed]
            parts.append(self._block_ND[take])
            self._offset += len(take)
            needed -= len(take)
            if self._offset == len(self._perm_N):
                self._block_ND = self._perm_N = None
                self._block_index += 1
                self._offset = 0
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict:
        # Without a block in memory the reader already sits at the start of the next one.
        start = self._block_start if self._block_ND is not None else self.reader.position()
        return {"block_start": start, "block_index": self._block_index, "offset": self._offset}

    def load_state_dict(self, state: dict) -> None:
        self.reader.seek(state["block_start"])
        self._block_ND = self._perm_N = None
        self._block_index = int(state["block_index"])
        self._offset = int(state["offset"])
