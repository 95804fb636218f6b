import json
import time

import pytest
import torch
from unit_readers import id_source

from sae_dist.data.prefetch import PrefetchingSource
from sae_dist.data.source import ActivationSource


def test_prefetched_stream_and_states_equal_the_plain_stream():
    plain, ahead = id_source(seed=3), PrefetchingSource(id_source(seed=3), depth=3)
    assert ahead.state_dict() == plain.state_dict()
    for size in (5, 5, 5, 5, 5, 5, 5, 5, 5, 5):
        assert torch.equal(ahead.next_batch(size), plain.next_batch(size))
        assert ahead.state_dict() == plain.state_dict()
    ahead.close()


def test_a_saved_state_resumes_exactly_while_the_producer_is_ahead():
    ahead = PrefetchingSource(id_source(seed=1), depth=4)
    for _ in range(6):
        ahead.next_batch(7)
    state = json.loads(json.dumps(ahead.state_dict()))
    fresh = id_source(seed=1)
    fresh.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(ahead.next_batch(7), fresh.next_batch(7))
    again = PrefetchingSource(id_source(seed=1), depth=2)
    again.load_state_dict(state)
    reference = id_source(seed=1)
    reference.load_state_dict(state)
    assert torch.equal(again.next_batch(11), reference.next_batch(11))
    ahead.close()
    again.close()


def test_another_batch_size_rewinds_to_what_was_taken():
    plain, ahead = id_source(seed=2), PrefetchingSource(id_source(seed=2), depth=4)
    for size in (4, 4, 9, 9, 3, 4):
        assert torch.equal(ahead.next_batch(size), plain.next_batch(size))
    ahead.close()


def test_the_producer_fills_the_next_block_while_the_queue_is_full():
    inner = id_source(block_rows=40)
    ahead = PrefetchingSource(inner, depth=1)
    ahead.next_batch(2)
    deadline = time.monotonic() + 30
    while inner._next_block is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inner._next_block is not None  # built although the consumer has not asked past the first block
    ahead.close()


class Failing(ActivationSource):
    d_model = 1

    def next_batch(self, batch_size):
        raise RuntimeError("disk on fire")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_errors_reach_the_consumer_and_close_stops_the_thread():
    ahead = PrefetchingSource(Failing(), depth=2)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ahead.next_batch(3)
    working = PrefetchingSource(id_source(), depth=2)
    working.next_batch(3)
    thread = working._producer.thread
    working.close()
    assert not thread.is_alive()
