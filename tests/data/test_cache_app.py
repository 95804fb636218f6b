"""launch/cache_activations.py: one process and two torchrun ranks write caches that hold exactly the live
activations of each rank."""

import errno
import importlib.util
import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sae_dist.data import CacheUnitReader, build_activation_source
from sae_dist.data.cache import MANIFEST, describe_cache
from sae_dist.data.cache_writer import CacheExistsError, rank_rows
from sae_dist.validation import to_cache_job_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "cache_activations.py"


def overrides(tiny_gpt2_dir, out_dir) -> list[str]:
    return [f"model.path={tiny_gpt2_dir}", "model.name=tiny", "model.layer=1", "data.dataset=pydoc-topics",
            "data.ctx_len=32", "data.shuffle_buffer=512", f"cache.out_dir={out_dir}", "cache.num_tokens=3001",
            "cache.shard_tokens=1000", "cache.dtype=float32", "cache.progress=false", "cache.seed=3"]


def compose_job(*args: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_cache_job_config(compose(config_name="cache_activations", overrides=list(args)))


def live_rows(job, rank: int, world_size: int, sampled: bool = True) -> torch.Tensor:
    """What the 'lm' source of the same model and text yields on rank `rank`, its documents in the cache job's
    order (seeded over the corpus; `sampled=False`: the corpus's own, the training source's): the rows the cache
    must hold."""
    from sae_dist.config import RunConfig, TrainerConfig
    from sae_dist.data import lm_activation_source, load_lm

    run = RunConfig(model=job.model, data=job.data, trainer=TrainerConfig(seed=job.cache.seed))
    run.data.prefetch = 0
    if sampled:
        model, tokenizer = load_lm(job.model)
        source = lm_activation_source(run, model, tokenizer, rank, world_size, document_seed=job.cache.seed)
    else:
        source = build_activation_source(run, rank, world_size)
    return source.next_batch(rank_rows(job.cache.num_tokens, rank, world_size))


def cached_rows(out_dir, rank: int) -> torch.Tensor:
    manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    reader = CacheUnitReader(out_dir)
    starts = [0]
    for shard in manifest["shards"]:
        starts.append(starts[-1] + shard["rows"])
    mine = [i for i, s in enumerate(manifest["shards"]) if s["file"].startswith(f"shard_{rank:05d}_")]
    return torch.cat([reader.read_rows(starts[i], starts[i + 1]) for i in mine])


def test_one_process_caches_the_live_activations(tiny_gpt2_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("cache_activations", SCRIPT)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    job = compose_job(*overrides(tiny_gpt2_dir, tmp_path / "cache"))
    manifest = json.loads(app.cache_activations(job, 0, 1, torch.device("cpu")).read_text())
    assert manifest["num_tokens"] == 3001 and manifest["d_model"] == 64 and manifest["dtype"] == "float32"
    assert manifest["site"] == {"hookpoint": None, "module": "h.1", "side": "output", "layer": 1,
                                "what": "output of block 1 (h.1)"}
    assert manifest["model"]["path"] == str(tiny_gpt2_dir)
    assert manifest["dataset"]["dataset"] == "pydoc-topics" and manifest["config"]["trainer"]["seed"] == 3
    assert torch.equal(cached_rows(tmp_path / "cache", 0), live_rows(job, 0, 1))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    with pytest.raises(CacheExistsError, match="already holds an activation cache"):
        app.cache_activations(job, 0, 1, torch.device("cpu"))
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}


def test_the_cache_samples_the_whole_corpus_and_records_its_order(tiny_gpt2_dir, tmp_path):
    """A cache of part of a corpus holds documents from all of it (seeded by cache.seed), not its first ones, and
    says so in its manifest. Before, a cache of 3,001 rows of pydoc-topics held the first topics in sorted order."""
    spec = importlib.util.spec_from_file_location("cache_activations", SCRIPT)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    job = compose_job(*overrides(tiny_gpt2_dir, tmp_path / "cache"))
    manifest = json.loads(app.cache_activations(job, 0, 1, torch.device("cpu")).read_text())
    assert manifest["documents"] == {"order": app.SAMPLED_ORDER, "seed": 3}
    assert "plan" in manifest["source_states"][0]
    assert not torch.equal(live_rows(job, 0, 1), live_rows(job, 0, 1, sampled=False))


def test_a_cache_begun_in_the_corpus_order_finishes_in_it(tiny_gpt2_dir, tmp_path):
    """An unfinished cache whose progress files lack the order (begun before sampled orders) resumes in the corpus's
    own order: its first shard and the rest are one stream."""
    from sae_dist.config import RunConfig, TrainerConfig
    from sae_dist.data.cache_writer import write_shards

    spec = importlib.util.spec_from_file_location("cache_activations", SCRIPT)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    job = compose_job(*overrides(tiny_gpt2_dir, tmp_path / "cache"), "data.prefetch=0")
    run = RunConfig(model=job.model, data=job.data, trainer=TrainerConfig(seed=3))
    old_settings = {"model": asdict(job.model), "data": asdict(job.data), "seed": 3}

    def interrupt(rows):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed after its first shard
        write_shards(build_activation_source(run), tmp_path / "cache", 3001, 1000, torch.float32, old_settings,
                     on_shard=interrupt)
    manifest = json.loads(app.cache_activations(job, 0, 1, torch.device("cpu")).read_text())
    assert manifest["documents"] == {"order": app.CORPUS_ORDER}
    assert torch.equal(cached_rows(tmp_path / "cache", 0), live_rows(job, 0, 1, sampled=False))


def test_a_cache_of_a_site_records_it_and_holds_its_live_activations(tiny_gpt2_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("cache_activations", SCRIPT)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    job = compose_job(*overrides(tiny_gpt2_dir, tmp_path / "cache"), "model.hookpoint=mlp_in.2", "cache.num_tokens=500")
    manifest = json.loads(app.cache_activations(job, 0, 1, torch.device("cpu")).read_text())
    assert manifest["site"] == {"hookpoint": "mlp_in.2", "module": "h.2.mlp", "side": "input", "layer": None,
                                "what": "input of h.2.mlp"}
    assert torch.equal(cached_rows(tmp_path / "cache", 0), live_rows(job, 0, 1))


def test_a_cache_of_transcoder_rows_records_both_sites_and_refuses_other_configs(tiny_gpt2_dir, tmp_path):
    from sae_dist.config import ConfigError, RunConfig
    from sae_dist.train.preflight import activation_width, check_inputs

    spec = importlib.util.spec_from_file_location("cache_activations", SCRIPT)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    job = compose_job(*overrides(tiny_gpt2_dir, tmp_path / "cache"), "model.hookpoint=mlp_in.2",
                      "model.target_hookpoint=mlp_out.2", "cache.num_tokens=500")
    manifest = json.loads(app.cache_activations(job, 0, 1, torch.device("cpu")).read_text())
    assert manifest["target_site"] == {"hookpoint": "mlp_out.2", "module": "h.2.mlp", "side": "output", "layer": None,
                                       "what": "output of h.2.mlp"}
    assert (manifest["d_model"], manifest["d_in"], manifest["d_out"]) == (128, 64, 64)
    assert describe_cache(manifest) == (f"{Path(tiny_gpt2_dir).name} transcoder rows: input of h.2.mlp (d_in=64) -> "
                                        "output of h.2.mlp (d_out=64) over pydoc-topics")
    assert torch.equal(cached_rows(tmp_path / "cache", 0), live_rows(job, 0, 1))
    run = RunConfig()
    run.data.source, run.data.cache_dir = "cache", str(tmp_path / "cache")
    run.model.hookpoint, run.model.target_hookpoint, run.sae.d_out = "mlp_in.2", "mlp_out.2", 64
    check_inputs(run)
    assert activation_width(run) == 64
    run.sae.d_out = 32
    with pytest.raises(ConfigError, match="holds targets 64 wide, not sae.d_out=32: set sae.d_out=64"):
        check_inputs(run)
    run.model.target_hookpoint, run.sae.d_out = None, None
    with pytest.raises(ConfigError, match=r"holds a transcoder's rows \[x \| y\]"):
        check_inputs(run)


def test_a_failed_write_stops_the_prefetch_thread(tiny_gpt2_dir, tmp_path, monkeypatch):
    """A write that fails (here a full disk after the first batch) leaves no prefetch thread running: one still
    inside the LM when the interpreter exits aborts the process in place of its one-line error."""
    spec = importlib.util.spec_from_file_location("cache_activations", SCRIPT)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)

    def full_disk(source, *args):
        source.next_batch(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(app, "write_shards", full_disk)
    job = compose_job(*overrides(tiny_gpt2_dir, tmp_path / "cache"), "data.prefetch=2")
    before = set(threading.enumerate())
    with pytest.raises(OSError, match="No space left"):
        app.cache_activations(job, 0, 1, torch.device("cpu"))
    assert not [t for t in set(threading.enumerate()) - before if t.name == "activation-prefetch"]


def test_two_ranks_write_disjoint_shards_of_the_live_activations(tiny_gpt2_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    args = [str(torchrun), "--standalone", "--nproc_per_node=2", str(SCRIPT), *overrides(tiny_gpt2_dir, tmp_path / "c")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["num_tokens"] == 3001
    assert [s["file"][:11] for s in manifest["shards"]] == ["shard_00000"] * 2 + ["shard_00001"] * 2
    job = compose_job(*overrides(tiny_gpt2_dir, tmp_path / "c"))
    for rank in range(2):
        assert torch.equal(cached_rows(tmp_path / "c", rank), live_rows(job, rank, 2))


@pytest.mark.parametrize(("override", "message"), [("cache.dtype=int8", "cache.dtype='int8' is unknown"),
                                                   ("data.source=synthetic", "a cache is written from data.source=lm")])
def test_bad_cache_options_are_config_errors(tiny_gpt2_dir, tmp_path, override, message):
    from sae_dist.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose_job(*overrides(tiny_gpt2_dir, tmp_path), override)
