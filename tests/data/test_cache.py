import hashlib
import json
from collections import Counter

import pytest
import torch

from sae_dist.config import ConfigError, ModelConfig, RunConfig
from sae_dist.data import (
    CachedActivationSource,
    DataUnavailableError,
    build_activation_source,
    cache_writer,
    write_cache,
)
from sae_dist.data import cache as cache_module
from sae_dist.data.cache import MANIFEST, CacheUnitReader, cache_site_mismatch
from sae_dist.data.cache_writer import CacheExistsError
from sae_dist.data.order import Plan, resume_state
from sae_dist.data.source import ActivationSource
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.train.preflight import check_inputs


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


def test_round_trip_and_manifest(tmp_path):
    manifest_path = write_cache(SyntheticSource(16, 8, 2, 0.1), tmp_path, 1000, 300, config={"who": "test"})
    manifest = json.loads(manifest_path.read_text())
    assert manifest["d_model"] == 16 and manifest["dtype"] == "float32" and manifest["config"] == {"who": "test"}
    assert manifest["num_tokens"] == 1000 and [s["rows"] for s in manifest["shards"]] == [300, 300, 300, 100]
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((tmp_path / shard["file"]).read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST] + [s["file"] for s in manifest["shards"]])
    expected = SyntheticSource(16, 8, 2, 0.1)
    expected = torch.cat([expected.next_batch(n) for n in (300, 300, 300, 100)])
    assert torch.equal(CacheUnitReader(tmp_path).read_rows(0, 1000), expected)
    assert torch.equal(CacheUnitReader(tmp_path).read_rows(250, 640), expected[250:640])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_disk(tmp_path, dtype):
    write_cache(SyntheticSource(16, 8, 2, 0.1), tmp_path, 100, 64, dtype=dtype)
    rows = CacheUnitReader(tmp_path).read_rows(0, 100)
    expected = SyntheticSource(16, 8, 2, 0.1)
    expected = torch.cat([expected.next_batch(64), expected.next_batch(36)])
    assert rows.dtype == torch.float32 and torch.equal(rows, expected.to(dtype).float())


def test_each_epoch_yields_every_row_once_in_a_new_order(cache):
    source = CachedActivationSource(cache, shuffle_buffer=128, seed=0)
    first, second = ids(source.next_batch(1000)), ids(source.next_batch(1000))
    assert sorted(first) == sorted(second) == list(range(1000))
    assert first != list(range(1000)) and first != second


def test_ranks_read_disjoint_rows(cache, monkeypatch):
    monkeypatch.setattr(cache_module, "UNIT_ROWS", 50)  # 20 chunks: each rank's first 150 rows are in epoch 0
    rows = [set(ids(CachedActivationSource(cache, 64, 0, rank, 3).next_batch(150))) for rank in range(3)]
    assert all(len(r) == 150 for r in rows)
    assert all(a.isdisjoint(b) for i, a in enumerate(rows) for b in rows[i + 1 :])


def test_changing_world_size_reads_every_row_of_an_epoch_once(cache, monkeypatch):
    monkeypatch.setattr(cache_module, "UNIT_ROWS", 50)  # 20 chunks of 50 rows per epoch, one per block
    make = lambda rank, world: CachedActivationSource(cache, 50, 1, rank, world)
    seen: Counter = Counter()
    sources = [make(rank, 2) for rank in range(2)]
    for world, batches in ((3, 3), (1, 2)):
        for _ in range(batches):
            for source in sources:
                seen.update(ids(source.next_batch(25)))
        saved = [json.loads(json.dumps(s.state_dict())) for s in sources]
        sources = [make(rank, world) for rank in range(world)]
        for rank, source in enumerate(sources):
            source.load_state_dict(resume_state(saved, rank, world))
    [last] = sources

    def owes_epoch_0(plan: Plan) -> bool:
        return plan.next < 20 or bool(plan.queue) or bool(plan.blocks)

    while owes_epoch_0(Plan.from_state(last.state_dict()["plan"])):
        seen.update(ids(last.next_batch(25)))
    assert seen == Counter(range(1000))


def test_resume_on_the_same_ranks_is_exact(cache):
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
    assert source.d_model == 3 and source.next_batch(10).shape == (10, 3)
    source.close()


def test_interrupted_write_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    write_cache(RowIds(), tmp_path / "whole", 1000, 300)
    real_save, calls = cache_writer.save_file, []

    def crash_on_third(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"half a shard")
            raise KeyboardInterrupt
        real_save(tensors, path)

    monkeypatch.setattr(cache_writer, "save_file", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_cache(RowIds(), tmp_path / "cut", 1000, 300)
    cut = tmp_path / "cut"
    assert sorted(p.name for p in cut.iterdir()) == [
        "progress_00000.json", "shard_00000_000000.safetensors", "shard_00000_000001.safetensors"]
    with pytest.raises(DataUnavailableError, match="unfinished cache"):
        CachedActivationSource(cut, 128)
    assert cache_writer.rows_written(cut, 0) == 600 and cache_writer.rows_written(cut, 1) == 0  # the resumed rows
    monkeypatch.setattr(cache_writer, "save_file", real_save)
    write_cache(RowIds(), cut, 1000, 300)
    for name in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_resuming_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_writer, "finish_cache", lambda *args: None)  # leave the job unfinished
    write_cache(RowIds(), tmp_path, 1000, 300)
    with pytest.raises(ConfigError, match="unfinished cache made with other shard_tokens"):
        cache_writer.write_shards(RowIds(), tmp_path, 1000, 200, settings={"config": {}})


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-5] ^= 0xFF
    elif how == "truncate":
        data = data[:-12]
    elif how == "header":
        data[10:20] = b"!" * 10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("how", "message"), [("flip", "is corrupt (sha256"), ("truncate", "is incomplete"),
                                              ("header", "is corrupt (unreadable header)"), ("delete", "is missing")])
def test_damaged_shard_is_named_in_one_line(cache, how, message):
    shard = cache / "shard_00000_000002.safetensors"
    shard.unlink() if how == "delete" else damage(shard, how)
    with pytest.raises(DataUnavailableError) as info:
        CachedActivationSource(cache, 128)
    assert str(shard) in str(info.value) and message in str(info.value) and "\n" not in str(info.value)
    if how == "flip":  # only the checksum sees a flipped bit; without verification the cache opens
        CachedActivationSource(cache, 128, verify=False)


def test_missing_cache_is_one_line_error(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        CachedActivationSource(tmp_path / "absent", 128)
    assert "\n" not in str(info.value) and "data.cache_dir=" in str(info.value)


def test_refuses_to_overwrite(cache):
    with pytest.raises(CacheExistsError, match="already holds an activation cache"):
        write_cache(RowIds(), cache, 10, 10)


SITE_CASES = [
    # (manifest's site record, model config, what the refusal says; None: accepted)
    ({"layer": 3, "what": "output of block 3 (hidden_states[4])"}, ModelConfig(layer=3), None),  # before sites
    ({"layer": 3, "what": "output of block 3 (hidden_states[4])"}, ModelConfig(layer=2),
     "the output of block 3, not model.layer=2"),
    ({"layer": 3, "what": "..."}, ModelConfig(hookpoint="resid_post.3"), None),
    ({"layer": 3, "what": "..."}, ModelConfig(hookpoint="mlp_out.3"),
     "the output of block 3, not model.hookpoint=mlp_out.3"),
    ({"hookpoint": "mlp_out.3", "module": "h.3.mlp", "side": "output", "layer": None},
     ModelConfig(hookpoint="mlp_out.3"), None),
    ({"hookpoint": "mlp_out.3", "module": "h.3.mlp", "side": "output", "layer": None},
     ModelConfig(hookpoint="h.3.mlp:output"), None),
    ({"hookpoint": "mlp_in.3", "module": "h.3.mlp", "side": "input", "layer": None}, ModelConfig(hookpoint="h.3.mlp"),
     "the input of h.3.mlp, not model.hookpoint=h.3.mlp"),
    ({"hookpoint": "mlp_in.3", "module": "h.3.mlp", "side": "input", "layer": None}, ModelConfig(layer=3),
     "the input of h.3.mlp, not model.layer=3"),
    ({"hookpoint": None, "module": "h.3", "side": "output", "layer": 3}, ModelConfig(layer=3), None),
    ({"hookpoint": "h.3", "module": "h.3", "side": "output", "layer": 3}, ModelConfig(layer=3), None),
]


@pytest.mark.parametrize(("site", "model", "message"), SITE_CASES)
def test_a_cache_holds_the_site_it_records(site, model, message):
    mismatch = cache_site_mismatch({"site": site}, model)
    assert mismatch is None if message is None else message in mismatch


def test_a_cache_without_a_site_record_is_its_configs_layer():
    """A one-process cache (`write_cache`) records only its producing config."""
    config = {"config": {"model": {"layer": 1, "hookpoint": None}}}
    assert cache_site_mismatch(config, ModelConfig(layer=1)) is None
    assert "the output of block 1" in cache_site_mismatch(config, ModelConfig(layer=2))
    of_a_site = {"config": {"model": {"layer": 1, "hookpoint": "mlp_in.1"}}}
    assert cache_site_mismatch(of_a_site, ModelConfig(hookpoint="mlp_in.1")) is None
    assert cache_site_mismatch(of_a_site, ModelConfig(layer=1)) == (
        "model.hookpoint=mlp_in.1, not model.layer=1; train with the cache's site or write a cache for this one")
    assert cache_site_mismatch({}, ModelConfig(layer=2)) is None  # nothing recorded: nothing to compare


def test_training_from_a_cache_of_another_site_is_refused(cache):
    run = RunConfig()
    run.data.source, run.data.cache_dir = "cache", str(cache)
    manifest_path = cache / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "site": {"layer": 3, "what": "output of block 3"}}))
    run.model.layer = 3
    check_inputs(run)
    run.model.hookpoint = "mlp_out.3"
    with pytest.raises(ConfigError, match=f"data.cache_dir={cache} holds the output of block 3, not "
                                          "model.hookpoint=mlp_out.3; train with the cache's site"):
        check_inputs(run)
