"""Transcoder rows from the 'lm' source: one pass reads an MLP's input x and its output y, rows [x | y] that equal the
module's weights applied by hand; a sweep's members, transcoders of every block and SAEs, read from one pass the rows
each would read alone; a target of another width than `sae.d_out` is one line, before and after loading the model;
the cache of such rows records both sites and refuses a config of an SAE, of another target, of another d_out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_dist.config import ConfigError, ModelConfig, RunConfig
from sae_dist.data import lm_activation_source
from sae_dist.data.cache import cache_site_mismatch, describe_cache
from sae_dist.data.sites import expand_site_pairs
from sae_dist.train.multi import member_sources, sweep_sites
from sae_dist.train.preflight import activation_width
from sae_dist.validation import sweep_members, validate


def minilm_transcoder(d_out: int = 384) -> RunConfig:
    run = RunConfig()
    run.model.name, run.model.hookpoint, run.model.target_hookpoint = "minilm-bundled", "mlp_in.3", "mlp_out.3"
    run.sae.d_out = d_out
    run.data.dataset, run.data.ctx_len, run.data.shuffle_buffer, run.data.prefetch = "pydoc-topics", 32, 256, 0
    return run


def test_rows_are_the_mlps_input_beside_its_output(minilm):
    """Block 3's MLP of the bundled MiniLM: y = output.dense(GELU(intermediate.dense(x))) for every row [x | y]."""
    model, tokenizer = minilm
    source = lm_activation_source(minilm_transcoder(), model, tokenizer)
    rows = source.next_batch(200)
    source.close()
    assert rows.shape == (200, 384 + 384)
    x, y = rows[:, :384], rows[:, 384:]
    layer = model.encoder.layer[3]
    by_hand = F.linear(F.gelu(F.linear(x, layer.intermediate.dense.weight, layer.intermediate.dense.bias)),
                       layer.output.dense.weight, layer.output.dense.bias)
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x, y, atol=1e-2)  # two sites, not one read twice


def test_rows_of_the_tiny_gpt2_mlp(tiny_gpt2, tiny_gpt2_dir):
    model, tokenizer = tiny_gpt2
    run = minilm_transcoder(64)
    run.model.name, run.model.path, run.model.hookpoint, run.model.target_hookpoint = (
        "tiny", str(tiny_gpt2_dir), "mlp_in.1", "mlp_out.1")
    source = lm_activation_source(run, model, tokenizer)
    rows = source.next_batch(100)
    source.close()
    x, y = rows[:, :64], rows[:, 64:]
    torch.testing.assert_close(y, model.h[1].mlp(x[:, None])[:, 0], rtol=1e-5, atol=1e-5)


def test_sweep_members_read_the_rows_of_their_sites_alone(minilm):
    """Transcoders of blocks 1 and 2 (a glob pair), one of block 1's MLP input to its 1536-wide hidden layer and an
    SAE of block 0: one pass of the LM, which stops after block 2, reads their six sites, and each member's rows
    equal, bit for bit, those of its (x, y) sites read alone; y of the glob pair is its own block's MLP applied by
    hand to x."""
    model, tokenizer = minilm
    run = minilm_transcoder()
    run.sweep = [{"model": {"hookpoint": "mlp_in.[12]", "target_hookpoint": "mlp_out.[12]"}},
                 {"model": {"hookpoint": "mlp_in.1", "target_hookpoint": "encoder.layer.1.intermediate"},
                  "sae": {"d_out": 1536}},
                 {"model": {"layer": 0, "hookpoint": None, "target_hookpoint": None}, "sae": {"d_out": None}}]
    validate(run)
    members = sweep_members(run, lambda glob, target: expand_site_pairs(model, glob, target))
    assert [(m.model.hookpoint, m.model.target_hookpoint, m.sae.d_out) for m in members] == [
        ("mlp_in.1", "mlp_out.1", 384), ("mlp_in.2", "mlp_out.2", 384),
        ("mlp_in.1", "encoder.layer.1.intermediate", 1536), (None, None, None)]
    assert members[0].name.endswith("_mlp_in.1_to_mlp_out.1")
    sites = sweep_sites(members)
    assert sites == ["mlp_in.1", "mlp_out.1", "mlp_in.2", "mlp_out.2", "encoder.layer.1.intermediate", 0]
    shared = lm_activation_source(run, model, tokenizer, sites=sites)
    assert shared.d_model == 4 * 384 + 1536 + 384  # one pass, every site once
    views = member_sources(members, shared)
    ran = []
    handle = model.encoder.layer[3].register_forward_pre_hook(lambda *args: ran.append(1))
    try:
        for member, view in zip(members, views, strict=True):
            alone = lm_activation_source(member, model, tokenizer)
            for _ in range(2):
                torch.testing.assert_close(view.next_batch(100), alone.next_batch(100), rtol=0, atol=0)
            alone.close()
    finally:
        handle.remove()
    assert not ran  # the pass stops after block 2, the deepest site
    rows = views[1].next_batch(100)
    shared.close()
    x, y = rows[:, :384], rows[:, 384:]
    layer = model.encoder.layer[2]
    by_hand = F.linear(F.gelu(F.linear(x, layer.intermediate.dense.weight, layer.intermediate.dense.bias)),
                       layer.output.dense.weight, layer.output.dense.bias)
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-5)


def test_a_sweep_member_whose_target_has_another_width_is_one_line(minilm):
    model, tokenizer = minilm
    run = minilm_transcoder()
    run.sweep = [{"model": {"hookpoint": "mlp_in.1", "target_hookpoint": "encoder.layer.1.intermediate"}}]
    members = sweep_members(run)
    shared = lm_activation_source(run, model, tokenizer, sites=sweep_sites(members))
    with pytest.raises(ConfigError, match="model.target_hookpoint=encoder.layer.1.intermediate is 1536 wide, not "
                                          "sae.d_out=384: set sae.d_out=1536"):
        member_sources(members, shared)
    shared.close()


def test_a_target_of_another_width_is_one_line_before_and_after_loading(minilm):
    run = minilm_transcoder(100)
    message = "model.target_hookpoint=mlp_out.3 is 384 wide, not sae.d_out=100: set sae.d_out=384"
    with pytest.raises(ConfigError, match=message):
        activation_width(run)  # preflight: the skeleton's widths
    model, tokenizer = minilm
    with pytest.raises(ConfigError, match=message):
        lm_activation_source(run, model, tokenizer)
    assert activation_width(minilm_transcoder()) == 384


def test_an_unknown_target_names_the_target_option(minilm):
    run = minilm_transcoder()
    run.model.target_hookpoint = "encoder.layer.3.nothing"
    with pytest.raises(ConfigError, match="model.target_hookpoint=encoder.layer.3.nothing: the model has no module"):
        activation_width(run)


TRANSCODER_CACHE = {
    "site": {"hookpoint": "mlp_in.3", "module": "h.3.mlp", "side": "input", "layer": None},
    "target_site": {"hookpoint": "mlp_out.3", "module": "h.3.mlp", "side": "output", "layer": None},
    "d_in": 64, "d_out": 64,
}
SAE_CACHE = {"site": {"hookpoint": "mlp_in.3", "module": "h.3.mlp", "side": "input", "layer": None}}


@pytest.mark.parametrize(("manifest", "model", "message"), [
    (TRANSCODER_CACHE, ModelConfig(hookpoint="mlp_in.3", target_hookpoint="mlp_out.3"), None),
    (TRANSCODER_CACHE, ModelConfig(hookpoint="mlp_in.3", target_hookpoint="h.3.mlp:output"), None),
    (SAE_CACHE, ModelConfig(hookpoint="mlp_in.3"), None),
    (TRANSCODER_CACHE, ModelConfig(hookpoint="mlp_in.3"),
     "a transcoder's rows [x | y] (target model.target_hookpoint=mlp_out.3), not an SAE's"),
    (SAE_CACHE, ModelConfig(hookpoint="mlp_in.3", target_hookpoint="mlp_out.3"),
     "an SAE's rows (one site, no target), not model.target_hookpoint=mlp_out.3"),
    ({"site": {"layer": 3, "what": "output of block 3"}}, ModelConfig(layer=3, target_hookpoint="mlp_out.3"),
     "an SAE's rows"),  # a manifest older than transcoders: an SAE's cache
    (TRANSCODER_CACHE, ModelConfig(hookpoint="mlp_in.3", target_hookpoint="mlp_out.2"),
     "the target the output of h.3.mlp, not model.target_hookpoint=mlp_out.2"),
    (TRANSCODER_CACHE, ModelConfig(hookpoint="mlp_in.2", target_hookpoint="mlp_out.3"),
     "the input of h.3.mlp, not model.hookpoint=mlp_in.2"),
])
def test_a_cache_of_transcoder_rows_holds_the_sites_it_records(manifest, model, message):
    mismatch = cache_site_mismatch(manifest, model)
    assert mismatch is None if message is None else message in mismatch
    assert mismatch is None or "\n" not in mismatch


@pytest.mark.parametrize(("manifest", "description"), [
    ({**TRANSCODER_CACHE, "model": {"name": "gpt2"}},
     "gpt2 transcoder rows: mlp_in.3 (d_in=64) -> mlp_out.3 (d_out=64) over unknown data"),
    ({"d_model": 96, "config": {"model": {"layer": 2, "target_hookpoint": "mlp_out.2"}, "sae": {"d_out": 32}}},
     "an unnamed model transcoder rows: block 2 (d_in=64) -> mlp_out.2 (d_out=32) over unknown data"),
    ({**SAE_CACHE, "model": {"name": "gpt2"}, "dataset": {"dataset": "json", "data_files": ["a.jsonl"]}},
     "gpt2 over json files a.jsonl"),
], ids=["recorded", "write_cache", "sae"])
def test_a_cache_description_names_a_transcoder_s_two_sites_and_widths(manifest, description):
    assert describe_cache(manifest) == description
