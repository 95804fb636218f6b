import json

import pytest
import torch

from sae_dist.config import RunConfig
from sae_dist.data import CachedActivationSource, DataUnavailableError, build_activation_source, write_cache
from sae_dist.data.cache import CacheBlockReader
from sae_dist.data.source import ActivationSource
from sae_dist.data.synthetic import SyntheticSource


class RowIds(ActivationSource):
    """Row i is (i, i, i): tells which rows a reader returns."""

    d_model = 3

    def __init__(self) -> None:
        self.next_row = 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        ids = torch.arange(self.next_row, self.next_row + batch_size, dtype=torch.float32)
        self.next_row += batch_size
        return ids[:, None].expand(-1, 3).clone()

    def state_dict(self) -> dict:
        return {"next_row": self.next_row}

    def load_state_dict(self, state: dict) -> None:
        self.next_row = state["next_row"]


def ids(rows: torch.Tensor) -> list[int]:
    return rows[:, 0].long().tolist()


@pytest.fixture
def cache(tmp_path):
    write_cache(RowIds(), tmp_path / "cache", num_tokens=1000, shard_tokens=300, config={"seed": 7})
    return tmp_path / "cache"


def test_round_trip(tmp_path):
    manifest_path = write_cache(SyntheticSource(16, 8, 2, 0.1), tmp_path, 1000, 300, config={"who": "test"})
    manifest = json.loads(manifest_path.read_text())
    assert manifest["d_model"] == 16 and manifest["dtype"] == "float32" and manifest["config"] == {"who": "test"}
    assert [s["rows"] for s in manifest["shards"]] == [300, 300, 300, 100]
    expected = SyntheticSource(16, 8, 2, 0.1)
    expected = torch.cat([expected.next_batch(n) for n in (300, 300, 300, 100)])
    assert torch.equal(CacheBlockReader(tmp_path, 10_000).read_rows(0, 1000), expected)
    assert torch.equal(CacheBlockReader(tmp_path, 10_000).read_rows(250, 640), expected[250:640])


def test_bfloat16_on_disk(tmp_path):
    write_cache(SyntheticSource(16, 8, 2, 0.1), tmp_path, 100, 64, dtype=torch.bfloat16)
    rows = CacheBlockReader(tmp_path, 100).read_rows(0, 100)
    expected = SyntheticSource(16, 8, 2, 0.1)
    expected = torch.cat([expected.next_batch(64), expected.next_batch(36)])
    assert rows.dtype == torch.float32 and torch.equal(rows, expected.bfloat16().float())


def test_one_epoch_yields_every_row_once_shuffled(cache):
    source = CachedActivationSource(cache, shuffle_buffer=128, seed=0)
    epoch = ids(source.next_batch(1000))
    assert sorted(epoch) == list(range(1000)) and epoch != list(range(1000))
    assert sorted(ids(source.next_batch(1000))) == list(range(1000))


def test_ranks_get_disjoint_rows(cache):
    rows = []
    for rank in range(3):
        reader = CacheBlockReader(cache, 128, rank, 3)
        owned = sorted(r for _ in reader.my_blocks for r in ids(reader.read_block()))
        assert sorted(ids(CachedActivationSource(cache, 128, 0, rank, 3).next_batch(len(owned)))) == owned
        rows.append(owned)
    assert sorted(r for rank_rows in rows for r in rank_rows) == list(range(1000))
    assert all(set(a).isdisjoint(b) for i, a in enumerate(rows) for b in rows[i + 1 :])


def test_resume_is_exact(cache):
    old = CachedActivationSource(cache, shuffle_buffer=128, seed=3, rank=1, world_size=2)
    for _ in range(5):
        old.next_batch(100)
    state = json.loads(json.dumps(old.state_dict()))
    fresh = CachedActivationSource(cache, shuffle_buffer=128, seed=3, rank=1, world_size=2)
    fresh.load_state_dict(state)
    for size in (100, 333, 7):
        assert torch.equal(old.next_batch(size), fresh.next_batch(size))


def test_build_dispatch(cache):
    run = RunConfig()
    run.data.source, run.data.cache_dir, run.data.shuffle_buffer = "cache", str(cache), 64
    source = build_activation_source(run, rank=0, world_size=2)
    assert isinstance(source, CachedActivationSource) and source.d_model == 3


def test_interrupted_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    import sae_dist.data.cache as cache_module

    real_save, calls = cache_module.save_file, []

    def crash_on_third(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"half a shard")
            raise KeyboardInterrupt
        real_save(tensors, path)

    monkeypatch.setattr(cache_module, "save_file", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_cache(RowIds(), tmp_path, 1000, 300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    with pytest.raises(DataUnavailableError, match="no manifest.json"):
        CachedActivationSource(tmp_path, 128)


def test_missing_cache_is_one_line_error(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        CachedActivationSource(tmp_path / "absent", 128)
    assert "\n" not in str(info.value) and "data.cache_dir=" in str(info.value)


def test_refuses_to_overwrite(cache):
    with pytest.raises(FileExistsError):
        write_cache(RowIds(), cache, 10, 10)
