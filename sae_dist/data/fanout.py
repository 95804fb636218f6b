"""One activation stream read by several consumers (several SAEs trained from one LM pass).

`SharedStream.view(i, columns)` is consumer i's source: its j-th batch is batch j of the stream, cut to
`columns`, slices of rows that hold several sites, side by side in their order (one site's columns, or a
transcoder's input and target sites, [x | y]). A batch is produced once, when the first consumer asks for it, and
kept until every consumer has taken it, so the consumers may run in lock-step (training) or one after another
(evaluation). A view's state is the stream's state after the view's last batch; views loaded with one state rewind
the stream once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sae_dist.data.source import ActivationSource


class SharedStream:
    """Batches of `source` handed to `consumers` views (module docstring)."""

    def __init__(self, source: ActivationSource, consumers: int) -> None:
        self.source = source
        self.consumers = consumers
        self._first = 0
        """Index of the oldest batch still held."""
        self._held: list[tuple[Tensor, dict]] = []
        self._taken = [0] * consumers
        self._loaded: dict | None = None

    def view(self, consumer: int, columns: Sequence[slice]) -> StreamView:
        return StreamView(self, consumer, columns)

    def batch(self, consumer: int, batch_size: int) -> tuple[Tensor, dict]:
        """(batch, stream state after it) of `consumer`'s next batch."""
        index = self._taken[consumer]
        while index >= self._first + len(self._held):
            self._held.append((self.source.next_batch(batch_size), self.source.state_dict()))
            self._loaded = None
        batch = self._held[index - self._first]
        if len(batch[0]) != batch_size:
            raise ValueError(f"consumers of a shared stream must take equal batches ({len(batch[0])} != {batch_size})")
        self._taken[consumer] += 1
        while self._held and min(self._taken) > self._first:
            self._held.pop(0)
            self._first += 1
        return batch

    def load_state_dict(self, state: dict) -> None:
        if state == self._loaded:
            return
        self.source.load_state_dict(state)
        self._loaded = state
        self._held.clear()
        self._first = 0
        self._taken = [0] * self.consumers


class StreamView(ActivationSource):
    """One consumer's source over a `SharedStream`."""

    def __init__(self, stream: SharedStream, consumer: int, columns: Sequence[slice]) -> None:
        self.stream = stream
        self.consumer = consumer
        self.columns = list(columns)
        self.d_model = sum(len(range(stream.source.d_model)[c]) for c in self.columns)
        self._state = stream.source.state_dict()

    def next_batch(self, batch_size: int) -> Tensor:
        batch, self._state = self.stream.batch(self.consumer, batch_size)
        if len(self.columns) == 1:
            return batch[:, self.columns[0]].contiguous()
        return torch.cat([batch[:, c] for c in self.columns], dim=1)

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
        self._state = state

    def close(self) -> None:
        self.stream.source.close()
