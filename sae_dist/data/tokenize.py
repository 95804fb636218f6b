"""Tokenisation off the critical path: documents become token contexts in order, in this thread, in worker
processes, or once before training.

With `workers` = 0 the calling thread (the prefetch thread) tokenises batches of documents with the fast
tokenizer (`ContextCutter`: the Rust tokenizer on all cores, without the GIL); with `workers` > 0 a pool of
single-threaded processes does, `2 * workers` batches ahead, so neither the tokenizer nor the Python work of
cutting contexts competes with the training thread for the GIL or its cores. Results come
back in order either way, so the stream is the same. `PretokenizedContexts` (data.pretokenize) cuts every
document once with `datasets.map` before training and then only reads token ids: the same contexts again.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from typing import TYPE_CHECKING

import numpy as np

from sae_dist.data.text import ContextCutter, Documents

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

DOCS_PER_CALL = 64
"""Documents tokenised per tokenizer call (one worker task)."""

_worker_state: dict = {}


def _init_worker(cut: ContextCutter) -> None:
    # One core per worker: the pool's size is the parallelism (the Rust tokenizer would otherwise start a thread
    # per core of the node in every worker).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state.update(cut=cut)


def _cut_in_worker(texts: list[str]) -> list[list[np.ndarray]]:
    return _worker_state["cut"](texts)


class Tokenization:
    """Cuts the documents of a `Documents` into contexts of at most `ctx_len` tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, ctx_len: int, workers: int = 0) -> None:
        self.cut = ContextCutter(tokenizer, ctx_len)
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # Workers fork from a clean server process that has imported this module once (forking this
            # process, whose prefetch and training threads hold locks, is unsafe; spawning re-imports per worker).
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(self.cut,),
            )
        return self._pool

    def contexts(self, documents: Documents, units: Iterator[int]) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(document index, its contexts) for each of `units` (global document indices), in order."""
        in_flight: deque[tuple[list[int], Future | list]] = deque()
        while True:
            while len(in_flight) < max(1, 2 * self.workers):
                batch = [unit for _, unit in zip(range(DOCS_PER_CALL), units)]
                if not batch:
                    break
                texts = documents.texts(batch)
                if self.workers:
                    in_flight.append((batch, self._executor().submit(_cut_in_worker, texts)))
                else:
                    in_flight.append((batch, self.cut(texts)))
            if not in_flight:
                return
            batch, result = in_flight.popleft()
            yield from zip(batch, result.result() if isinstance(result, Future) else result, strict=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _cut_for_map(batch: dict[str, list], cut: ContextCutter, text_column: str) -> dict:
    return {"contexts": [[ids.tolist() for ids in doc] for doc in cut(batch[text_column])]}


class PretokenizedContexts:
    """`Tokenization`'s contexts from a dataset cut once before training (`datasets.map` over `num_proc`
    processes; `datasets` caches the result on disk when the dataset has cache files, so a rerun reads it)."""

    def __init__(
        self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, ctx_len: int, text_column: str, num_proc: int
    ) -> None:
        self.ids = dataset.map(
            _cut_for_map,
            fn_kwargs={"cut": ContextCutter(tokenizer, ctx_len), "text_column": text_column},
            batched=True,
            batch_size=DOCS_PER_CALL,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=dataset.column_names,
            desc="pretokenising",
        )

    def contexts(self, documents: Documents, units: Iterator[int]) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(document index, its contexts) for each of `units`, in order, read from the pretokenised dataset."""
        while batch := [unit for _, unit in zip(range(DOCS_PER_CALL), units)]:
            rows = self.ids[[g % documents.per_epoch for g in batch]]["contexts"]
            yield from zip(batch, ([np.asarray(ids, dtype=np.int32) for ids in doc] for doc in rows), strict=True)

    def close(self) -> None:
        pass
