"""Activation sources that misbehave on purpose, shared by the fault tests (in one process and under gloo)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import torch

from sae_dist.data.source import ActivationSource


class FaultySource(ActivationSource):
    """Wraps a source; `faults` maps a 1-based batch number to a function applied to that batch (or called for its
    side effect: a signal, a stall, a full disk)."""

    def __init__(self, source: ActivationSource, faults: dict[int, Callable[[torch.Tensor], torch.Tensor | None]]):
        self.source, self.faults = source, faults
        self.d_model = source.d_model
        self.batches = 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        self.batches += 1
        x_TD = self.source.next_batch(batch_size)
        fault = self.faults.get(self.batches)
        changed = fault(x_TD) if fault is not None else None
        return x_TD if changed is None else changed

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def poison(rows: int, value: float = float("nan")) -> Callable[[torch.Tensor], torch.Tensor]:
    """Set `rows` rows of the batch (spread over it) to `value`."""

    def apply(x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD.clone()
        x_TD[torch.linspace(0, len(x_TD) - 1, rows).long()] = value
        return x_TD

    return apply


def send(sig: signal.Signals) -> Callable[[torch.Tensor], None]:
    return lambda x_TD: os.kill(os.getpid(), sig)


def stall(seconds: float) -> Callable[[torch.Tensor], None]:
    return lambda x_TD: time.sleep(seconds)
