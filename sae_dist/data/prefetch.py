"""Prefetch: the next batches of a source are produced in a background thread while the training step runs.

The thread calls `source.next_batch` and puts each batch, with the source's state after it, into a queue of
`depth` batches; while the queue is full it calls `source.work_ahead()` (for a block-shuffled source: the LM
forwards of the next block), so production never stops while the consumer is busy. On a GPU the thread works
in its own CUDA stream and hands each batch over with an event, so the LM forward and the SAE step overlap on
the device as well.

The state the consumer sees is the state after the last batch it took, not the producer's: checkpoints stay
exact. A call with another batch size, or `load_state_dict`, stops the thread and rewinds the source.

`close()` stops the thread; a producer still running when the interpreter exits (a source never closed) is stopped
and joined by an exit handler, before finalisation: one that ends during finalisation, releasing its tensors, is
killed inside torch and aborts the process (`terminate called without an active exception`, status 134; seen at
the exit of test runs whose trainers were never closed).
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import time
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from sae_dist.data.source import ActivationSource

_POLL_S = 0.05
"""How often a producer blocked on a full queue checks whether it should stop."""


class _Batch(NamedTuple):
    batch: Tensor
    state: dict
    ready: torch.cuda.Event | None


class _Failure(NamedTuple):
    error: BaseException


def _produce(
    source: ActivationSource,
    batch_size: int,
    out: queue.Queue,
    stop: threading.Event,
    stream: torch.cuda.Stream | None,
) -> None:
    """The producer loop; every exception is handed to the consumer."""
    try:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while not stop.is_set():
                batch = source.next_batch(batch_size)
                ready = None
                if stream is not None:
                    batch = batch.to(stream.device, non_blocking=True)  # a source that yields host rows
                    ready = torch.cuda.Event()
                    ready.record(stream)
                item = _Batch(batch, source.state_dict(), ready)
                while not stop.is_set():
                    try:
                        out.put_nowait(item)
                        break
                    except queue.Full:
                        if not source.work_ahead():
                            with contextlib.suppress(queue.Full):
                                out.put(item, timeout=_POLL_S)
                                break
    except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
        out.put(_Failure(error))


class _Producer(NamedTuple):
    thread: threading.Thread
    stop: threading.Event
    out: queue.Queue

    def end(self, timeout_s: float | None = None) -> None:
        """Ask the thread to stop and wait for its end (at most `timeout_s`), taking what it puts meanwhile."""
        self.stop.set()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.thread.is_alive() and (deadline is None or time.monotonic() < deadline):
            with contextlib.suppress(queue.Empty):
                self.out.get(timeout=_POLL_S)


_RUNNING: set[_Producer] = set()
"""Every producer started and not yet ended, whether or not its source still exists."""
_EXIT_WAIT_S = 30.0
"""How long the exit handler waits for each producer (one inside a source's call ends after it)."""


@atexit.register
def _end_producers() -> None:
    for producer in list(_RUNNING):
        producer.end(_EXIT_WAIT_S)


class PrefetchingSource(ActivationSource):
    """`source` with its next `depth` batches produced ahead in a background thread (module docstring)."""

    def __init__(self, source: ActivationSource, depth: int, device: str | torch.device = "cpu") -> None:
        self.source = source
        self.d_model = source.d_model
        self.depth = depth
        self.device = torch.device(device)
        self.wait_s = 0.0
        """Seconds `next_batch` has waited for the producer so far."""
        self._state = source.state_dict()
        self._producer: _Producer | None = None
        self._stop = threading.Event()
        """The stop of this source's producers (set when the source is collected, too)."""
        self._batch_size = 0
        weakref.finalize(self, self._stop.set)

    def _start(self, batch_size: int) -> None:
        self._stop_thread()
        self._batch_size = batch_size
        self._stop.clear()
        out: queue.Queue = queue.Queue(self.depth)
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        thread = threading.Thread(
            target=_produce, args=(self.source, batch_size, out, self._stop, stream), name="activation-prefetch",
            daemon=True,
        )
        thread.start()
        self._producer = _Producer(thread, self._stop, out)
        _RUNNING.add(self._producer)

    def _stop_thread(self) -> None:
        """Stop the producer and rewind the source to what the consumer has taken."""
        if self._end_producer():
            self.source.load_state_dict(self._state)

    def _end_producer(self) -> bool:
        """Stop the producer and wait for its end; whether there was one."""
        if self._producer is None:
            return False
        self._producer.end()
        _RUNNING.discard(self._producer)
        self._producer = None
        return True

    def next_batch(self, batch_size: int) -> Tensor:
        if self._producer is None or batch_size != self._batch_size:
            self._start(batch_size)
        start = time.perf_counter()
        item = self._producer.out.get()
        self.wait_s += time.perf_counter() - start
        if isinstance(item, _Failure):
            self._end_producer()  # it has ended after putting its failure
            raise item.error
        if item.ready is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(item.ready)
            item.batch.record_stream(consumer)
        self._state = item.state
        return item.batch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._stop_thread()
        self._state = state
        self.source.load_state_dict(state)

    def close(self) -> None:
        """Stop the producer. Call it before the process exits, also on an error: a daemon producer still inside
        torch when the interpreter finalises is ended mid-call and aborts the process (`terminate called without
        an active exception`, status 134 in place of the launcher's exit status)."""
        self._stop_thread()
        self.source.close()
