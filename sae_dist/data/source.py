"""The interface every activation source implements, and the error raised when its data cannot be had."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import numpy as np
from huggingface_hub import HfApi
from torch import Tensor


class DataUnavailableError(RuntimeError):
    """A model, dataset or cache is missing, unreadable or corrupt; the message is one line saying which and how to
    get it."""


class ActivationSource(ABC):
    """An endless, rank-local stream of activation vectors with an exactly resumable position.

    A fresh source built from the same config, after `load_state_dict(old.state_dict())`, yields bit for bit the
    batches `old` would have yielded next. The state is small (ints, lists, RNG seeds), never activations;
    `order.resume_state` turns the states saved by every rank of a run into one rank's state on another world size.
    """

    d_model: int
    """Width of every activation row (for several hook sites: sites x d, concatenated; for a transcoder, the input
    x and its target y, [x | y], `sae.d_out` of them y: docs/math.md section 9)."""

    @abstractmethod
    def next_batch(self, batch_size: int) -> Tensor:
        """The next `batch_size` activations: float32 [batch_size, d_model] on the source's device."""

    @abstractmethod
    def state_dict(self) -> dict:
        """The position in the stream: JSON-able ints and lists."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Continue from a position returned by `state_dict` of a source built from the same config."""

    def work_ahead(self) -> bool:
        """Do one piece of work for later batches (e.g. one LM forward of the next shuffle block) without
        changing what `next_batch` returns; False when there is nothing to do. Called by the prefetch thread
        while its queue is full."""
        return False

    def close(self) -> None:
        """Stop background threads and worker processes; the source may not be used afterwards."""


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (e.g. seed, rank, block index) with NumPy's SeedSequence."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


HUB_PROBE_TIMEOUT_S = 5.0
"""Seconds one Hub metadata request may take before the Hub counts as unreachable."""


@functools.cache
def _hub_answers(repo_id: str, repo_type: str) -> None:
    """One metadata request; an answer is remembered for the process (the preflight and the loader both ask),
    a failure is not."""
    HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_PROBE_TIMEOUT_S)


def require_hub(repo_id: str, repo_type: str, hint: str) -> None:
    """Raise a one-line DataUnavailableError at once unless `repo_id` answers on the Hugging Face Hub.

    One metadata request with a short timeout and no retries: the download clients retry for ~30 s first.
    """
    try:
        _hub_answers(repo_id, repo_type)
    except Exception as exc:  # offline mode, DNS, timeout, not found, gated: all mean "cannot download"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataUnavailableError(f"cannot download {repo_type} '{repo_id}' from the Hub ({reason}); {hint}") from None
