"""benchmarks/reproduce_paper_small.py: runs at the training cache's site (a transcoder cache's runs are
transcoders); the held-out set: rows from all over the held-out cache, its documents counted, scores stored per
held-out set. Before, the scored rows were the cache's first 65,536 (one shuffle block: the documents read first),
and --report-only with another --heldout-cache reused the scores stored for the first (points keyed by step)."""

from __future__ import annotations

import argparse

import torch

import benchmarks.reproduce_paper_small as repro
from sae_dist.config import ModelConfig
from sae_dist.data import build_activation_source
from sae_dist.data.cache import CacheUnitReader
from sae_dist.data.cache_writer import write_cache
from sae_dist.data.synthetic import SyntheticSource
from sae_dist.eval import learning_curves
from sae_dist.train.trainer import Trainer
from tests.conftest import small_run


def test_the_heldout_rows_come_from_the_whole_cache(tmp_path):
    write_cache(SyntheticSource(8, 8, 2, 0.1), tmp_path / "cache", 100_000, 25_000)
    folder = repro.spread_heldout(tmp_path / "cache", 4096, tmp_path / "out")
    picked = CacheUnitReader(folder).read_rows(0, 4096)
    everything = CacheUnitReader(tmp_path / "cache").read_rows(0, 100_000)
    piece = 4096 // repro.HELDOUT_PIECES
    assert torch.equal(picked[:piece], everything[:piece])
    assert torch.equal(picked[-piece:], everything[-piece:]), "the last stretch is not the cache's end"
    assert repro.spread_heldout(tmp_path / "cache", 4096, tmp_path / "out") == folder  # written once


def test_scores_are_stored_per_heldout_set(tmp_path, monkeypatch):
    run = small_run(tmp_path, steps=10, checkpoint_every=5)
    Trainer(run, build_activation_source(run)).train()
    for seed in (1, 2):
        write_cache(SyntheticSource(64, 128, 4, 0.01, seed=seed), tmp_path / f"heldout{seed}", 2048, 2048)
    scored = []
    metrics = learning_curves.heldout_metrics
    monkeypatch.setattr(learning_curves, "heldout_metrics",
                        lambda *args, **kw: scored.append(args[1]) or metrics(*args, **kw))
    run_dir = tmp_path / "run"
    curves = {}
    for seed in (1, 2, 1):
        cache = tmp_path / f"heldout{seed}"
        curves.setdefault(seed, []).append(repro.keyed_curve(run_dir, cache, repro.heldout_key(cache, 2048)))
    assert scored == [tmp_path / "heldout1"] * 2 + [tmp_path / "heldout2"] * 2, "scores reused across held-out sets"
    assert curves[1][0] == curves[1][1] and curves[1][0] != curves[2][0]


def test_runs_read_the_training_cache_site_and_transcoder_caches_make_transcoders():
    block = {"model": {"name": "minilm-bundled", "path": None}, "site": {"hookpoint": None, "layer": 3}}
    assert repro.cache_model(block) == ModelConfig(name="minilm-bundled", layer=3)
    mlp = {"model": {"name": "gpt2", "path": "/m"}, "site": {"hookpoint": "mlp_in.3", "layer": None},
           "target_site": {"hookpoint": "mlp_out.3"}, "d_out": 384}
    model = repro.cache_model(mlp)
    assert (model.name, model.path, model.hookpoint, model.target_hookpoint) == ("gpt2", "/m", "mlp_in.3", "mlp_out.3")
    args = argparse.Namespace(width=16, experts=4, ks=[8], dead_tokens=1000, dense_auxk_scales=["x_variance", "gao"])
    runs = repro.planned_runs(args, ["paper"], d_out=384)
    assert {sae.d_out for _, _, sae, _ in runs.values()} == {384}
    assert {sae.d_out for _, _, sae, _ in repro.planned_runs(args, ["paper"]).values()} == {None}
    dense = {name: sae.auxk_scale for name, (_, family, sae, _) in runs.items() if family == "dense"}
    assert dense == {"dense_k8": "x_variance", "dense_auxk_gao_k8": "gao"}


def test_the_heldout_documents_are_counted_from_the_readers_plans():
    # One reader that began documents 0..29 (the last block, 19..29, in part) and two that share 0..9.
    one = {"source_states": [{"plan": {"next": 30, "stride": 1, "blocks": [{"units": [[19, 30, 1]], "offset": 7}],
                                       "queue": []}}]}
    two = {"source_states": [{"plan": {"next": 10, "stride": 2, "blocks": [], "queue": []}},
                             {"plan": {"next": 11, "stride": 2, "blocks": [], "queue": []}}]}
    assert repro.documents_held(one) == 30 and repro.documents_held(two) == 10
    assert repro.documents_held({"config": {}}) is None, "a cache of rows (write_cache) records no documents"
