"""Sites (`model.hookpoint`): every site of the bundled MiniLM and a tiny random GPT-2 equals a hand computation from
the modules' weights; `model.layer` alone reads what it always read; names and sides are refused in one line with
the closest names; several sites come from one pass that stops after the last of them; replacing a site's input or
output changes what the model computes as the hand computation says."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from sae_dist.config import ConfigError, ModelConfig, RunConfig
from sae_dist.data import HookedLM, build_activation_source, model_site, resolve_site, site_columns, splice
from sae_dist.data.lm import lm_skeleton, load_lm
from sae_dist.data.sites import Site, expand_hookpoint, expand_site_pairs, site_module, site_width, skeleton
from sae_dist.train.preflight import activation_width
from sae_dist.train.run import train_from_config
from sae_dist.validation import sweep_members, validate
from tests.conftest import small_run

CONTEXTS = [[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 102], [101, 1037, 2146, 6251, 2007, 2062, 2616, 102]]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in CONTEXTS)
    ids = torch.tensor([c + [0] * (width - len(c)) for c in CONTEXTS])
    return ids, (ids != 0).long()


def read(model, *hookpoints) -> list[torch.Tensor]:
    """Each site's activations [B, T, d], read alone."""
    ids, mask = batch()
    return [HookedLM(model, hookpoint)._hidden_states(ids, mask)[0] for hookpoint in hookpoints]


def layer_norm(x, module):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def test_minilm_sites_equal_the_hand_computation(minilm):
    """Block 2 of the post-LayerNorm BERT: the MLP reads the attention block's output a and gives
    output.dense(GELU(intermediate.dense(a))), before dropout, the residual and the LayerNorm."""
    model, _ = minilm
    layer = model.encoder.layer[2]
    ids, mask = batch()
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    resid_pre, attn_out, attn_block, mlp_in, hidden_mlp, mlp_out, resid_post = read(
        model, "resid_pre.2", "attn_out.2", "encoder.layer.2.attention", "mlp_in.2",
        "encoder.layer.2.intermediate:output", "mlp_out.2", "encoder.layer.2:output")
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(resid_pre, hidden[2], **exact)
    torch.testing.assert_close(resid_post, hidden[3], **exact)
    torch.testing.assert_close(mlp_in, attn_block, **exact)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn_block, layer_norm(attn_out + resid_pre, layer.attention.output.LayerNorm), **close)
    by_hand = F.gelu(F.linear(mlp_in, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
    torch.testing.assert_close(hidden_mlp, by_hand, **close)
    assert hidden_mlp.shape[-1] == 1536
    torch.testing.assert_close(mlp_out, F.linear(by_hand, layer.output.dense.weight, layer.output.dense.bias), **close)
    torch.testing.assert_close(resid_post, layer_norm(mlp_out + mlp_in, layer.output.LayerNorm), **close)


def test_gpt2_sites_equal_the_hand_computation(tiny_gpt2):
    """Block 1 of a pre-LayerNorm GPT-2: resid_mid = resid_pre + attn_out, mlp_in = ln_2(resid_mid),
    mlp_out = c_proj(GELU_tanh(c_fc(mlp_in))), resid_post = resid_mid + mlp_out."""
    model, _ = tiny_gpt2
    block = model.h[1]
    ids, mask = batch()
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    resid_pre, attn_out, mlp_in, mlp_out, resid_post = read(
        model, "h.1:input", "attn_out.1", "transformer.h.1.mlp:input", "h.1.mlp", "resid_post.1")
    torch.testing.assert_close(resid_pre, hidden[1], rtol=0, atol=0)
    torch.testing.assert_close(resid_post, hidden[2], rtol=0, atol=0)
    resid_mid = resid_pre + attn_out
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlp_in, layer_norm(resid_mid, block.ln_2), **close)
    fc = F.gelu(mlp_in @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, approximate="tanh")
    torch.testing.assert_close(mlp_out, fc @ block.mlp.c_proj.weight + block.mlp.c_proj.bias, **close)
    torch.testing.assert_close(resid_post, resid_mid + mlp_out, **close)


def test_the_layer_shorthand_reads_what_it_always_read(tiny_gpt2, minilm):
    """model.layer=L, its alias resid_post.L and the block's name read one and the same tensor."""
    for model, name in ((tiny_gpt2[0], "h.1"), (minilm[0], "encoder.layer.1")):
        by_layer, by_alias, by_name = read(model, 1, "resid_post.1", name)
        torch.testing.assert_close(by_alias, by_layer, rtol=0, atol=0)
        torch.testing.assert_close(by_name, by_layer, rtol=0, atol=0)
        assert model_site(model, ModelConfig(layer=1)) == resolve_site(model, name) == Site(name, "output", 1)


@pytest.mark.parametrize(("hookpoint", "message"), [
    ("encoder.layer.3.intermedate", "model.hookpoint=encoder.layer.3.intermedate: the model has no module "
                                    "'encoder.layer.3.intermedate'; closest: encoder.layer.3.intermediate"),
    ("encoder.layer.3:sideways", "the side='sideways' is unknown; allowed: output, input"),
    ("embeddings:input", "embeddings gets token ids or is called with keywords"),
    ("embeddings.word_embeddings:input", "gets token ids"),
    ("mlp_out.9", "model.hookpoint=mlp_out.9: block 9 is out of range: the model has 6 blocks"),
])
def test_bad_sites_are_one_line_from_the_skeleton(minilm, hookpoint, message):
    """Refused from the module names of the model built on the meta device, before any weight is read."""
    frame = lm_skeleton(ModelConfig(name="minilm-bundled"))
    assert next(frame.parameters()).device.type == "meta"
    with pytest.raises(ConfigError) as refused:
        resolve_site(frame, hookpoint)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_an_alias_of_another_architecture_is_refused(tiny_gpt2_dir):
    """resid_pre / resid_post work wherever the blocks are found; the others need the model type's table."""
    frame = skeleton(AutoConfig.from_pretrained(tiny_gpt2_dir))
    frame.config.model_type = "gptj"
    assert resolve_site(frame, "resid_pre.2") == Site("h.2", "input")
    with pytest.raises(ConfigError, match="the alias mlp_out is known for model types gpt2, bert, llama, not 'gptj'"):
        resolve_site(frame, "mlp_out.1")


def test_the_skeleton_gives_the_sites_width(tiny_gpt2_dir):
    frame = skeleton(AutoConfig.from_pretrained(tiny_gpt2_dir))
    widths = {hookpoint: site_width(frame, resolve_site(frame, hookpoint))
              for hookpoint in ("h.1", "h.1:input", "h.1.mlp", "h.1.mlp.c_fc", "h.1.attn", "mlp_in.0", "ln_f")}
    assert widths == {"h.1": 64, "h.1:input": 64, "h.1.mlp": 64, "h.1.mlp.c_fc": 256, "h.1.attn": 64, "mlp_in.0": 64,
                      "ln_f": 64}


def test_preflight_reads_the_width_of_a_site(tiny_gpt2_dir):
    run = RunConfig(model=ModelConfig(name="tiny", path=str(tiny_gpt2_dir), layer=99, hookpoint="h.2.mlp.c_fc"))
    assert activation_width(run) == 256  # model.layer is not read when a hookpoint is set
    run.model.hookpoint = "h.2.mlp.c_fx"
    with pytest.raises(ConfigError, match="closest: h.2.mlp.c_fc"):
        activation_width(run)


def test_globs_match_dotted_parts(minilm):
    assert expand_hookpoint(minilm[0], "encoder.layer.*.attention") == [
        f"encoder.layer.{i}.attention:output" for i in range(6)]
    assert expand_hookpoint(minilm[0], "encoder.layer.[12].output.dense:input") == [
        "encoder.layer.1.output.dense:input", "encoder.layer.2.output.dense:input"]
    with pytest.raises(ConfigError, match="matches no module"):
        expand_hookpoint(minilm[0], "encoder.layer.*.mlp")


def test_a_glob_makes_one_sweep_member_per_module(tmp_path, minilm):
    run = small_run(tmp_path)
    run.data.source, run.model.name = "lm", "minilm-bundled"
    run.sweep = [{"model": {"hookpoint": "encoder.layer.*.intermediate:input"}}, {"model": {"layer": 2}}]
    validate(run)  # without the model: the glob's syntax only
    members = sweep_members(run, lambda glob, target: expand_site_pairs(minilm[0], glob, target))
    assert [m.model.hookpoint for m in members] == [*(f"encoder.layer.{i}.intermediate:input" for i in range(6)), None]
    assert members[3].name.endswith("_encoder.layer.3.intermediate-input") and members[-1].name.endswith("_L2")
    run.sweep, run.model.hookpoint = [], "encoder.layer.*.attention"
    with pytest.raises(ConfigError, match="is a glob: put it in a sweep item"):
        validate(run)


def test_globs_over_an_aliases_blocks(minilm):
    assert expand_hookpoint(minilm[0], "mlp_out.*") == [f"mlp_out.{i}" for i in range(6)]
    assert expand_hookpoint(minilm[0], "resid_pre.[0-1]") == ["resid_pre.0", "resid_pre.1"]
    with pytest.raises(ConfigError, match=re.escape("model.target_hookpoint=mlp_out.[7-9] matches no module")):
        expand_hookpoint(minilm[0], "mlp_out.[7-9]", "model.target_hookpoint")
    with pytest.raises(ConfigError, match="the alias mlp_out is known for model types gpt2, bert, llama, not 'gptj'"):
        expand_hookpoint(skeleton(AutoConfig.for_model("gptj", n_layer=2, n_embd=64, n_head=4)), "mlp_out.*")


def test_glob_pairs_pair_by_block(minilm):
    """A glob target pairs each match with the input site of its block, whatever the names that match; globs that
    match other counts or blocks, or a glob target beside one input site, are one line."""
    model, _ = minilm
    pairs = expand_site_pairs(model, "encoder.layer.[34].intermediate:input", "mlp_out.[34]")
    assert pairs == [("encoder.layer.3.intermediate:input", "mlp_out.3"),
                     ("encoder.layer.4.intermediate:input", "mlp_out.4")]
    assert expand_site_pairs(model, "mlp_in.[01]", "mlp_out.5") == [("mlp_in.0", "mlp_out.5"), ("mlp_in.1", "mlp_out.5")]
    assert expand_site_pairs(model, "mlp_in.[01]", None) == [("mlp_in.0", None), ("mlp_in.1", None)]
    refusals = [
        ("mlp_in.[0-2]", "mlp_out.*", ("model.target_hookpoint=mlp_out.* matches 6 sites but model.hookpoint="
                                       "mlp_in.[0-2] matches 3: a pair of globs makes one transcoder per block")),
        ("mlp_in.[0-2]", "mlp_out.[3-5]", ("model.hookpoint=mlp_in.[0-2] and model.target_hookpoint=mlp_out.[3-5] "
                                           "do not pair by block: their matches lie in blocks [0, 1, 2] and [3, 4, 5]")),
        ("encoder.layer.[01].*.dense", "mlp_out.[0-3]", "blocks [0, 0, 1, 1] and [0, 1, 2, 3]"),  # two in a block
    ]
    for hookpoint, target, message in refusals:
        with pytest.raises(ConfigError, match=re.escape(message)):
            expand_site_pairs(model, hookpoint, target)
    run = RunConfig(model=ModelConfig(name="minilm-bundled"), sae=replace(RunConfig().sae, d_out=384))
    run.sweep = [{"model": {"hookpoint": "mlp_in.2", "target_hookpoint": "mlp_out.*"}}]
    with pytest.raises(ConfigError, match=re.escape("sweep[0]: model.target_hookpoint=mlp_out.* is a glob: pair it "
                                                    "with a glob model.hookpoint in the same item")):
        validate(run)
    run.sweep, run.model.hookpoint, run.model.target_hookpoint = [], "mlp_in.*", "mlp_out.*"
    with pytest.raises(ConfigError, match=re.escape("model.hookpoint=mlp_in.* is a glob: put it in a sweep item "
                                                    "(sweep=[{model: {hookpoint: 'mlp_in.*', target_hookpoint: "
                                                    "'mlp_out.*'}}]), one transcoder per block")):
        validate(run)
    run.model.hookpoint = "mlp_in.3"
    with pytest.raises(ConfigError, match=re.escape("model.target_hookpoint=mlp_out.* is a glob: pair it with a glob "
                                                    "model.hookpoint in a sweep item")):
        validate(run)


def test_one_pass_reads_several_sites_and_stops_after_the_last(tiny_gpt2):
    """Rows of two sites side by side equal each site read alone (bit for bit); block 2 never runs."""
    model, _ = tiny_gpt2
    contexts = [torch.tensor(c).numpy() for c in CONTEXTS]
    ran = []
    handle = model.h[2].register_forward_pre_hook(lambda *args: ran.append(1))
    try:
        both = HookedLM(model, ["h.1.mlp.c_fc", "h.0:input"]).capture(contexts, pad_id=0)
    finally:
        handle.remove()
    alone = [HookedLM(model, site).capture(contexts, pad_id=0) for site in ("h.1.mlp.c_fc", "h.0:input")]
    torch.testing.assert_close(both, torch.cat(alone, dim=1), rtol=0, atol=0)
    assert both.shape[1] == 256 + 64 and not ran


def test_a_source_of_two_sites_equals_two_sources(tiny_gpt2_dir):
    run = RunConfig()
    run.model.name, run.model.path = "tiny", str(tiny_gpt2_dir)
    run.data.dataset, run.data.ctx_len, run.data.shuffle_buffer, run.data.prefetch = "pydoc-topics", 32, 256, 2
    sites = ["mlp_in.1", "h.0.attn"]
    shared = build_activation_source(run, sites=sites)
    columns = site_columns(shared)
    rows = shared.next_batch(100)
    for site, cols in zip(sites, columns, strict=True):
        run.model.hookpoint = site
        alone = build_activation_source(run)
        torch.testing.assert_close(rows[:, cols], alone.next_batch(100), rtol=0, atol=0)
        alone.close()
    shared.close()


def test_splicing_a_modules_input_and_output(tiny_gpt2):
    """Adding 1 to the MLP's input (pre-hook) and doubling its output (hook) give the block output by hand."""
    model, _ = tiny_gpt2
    block = model.h[1]
    ids, mask = batch()
    resid_pre, attn_out = read(model, "h.1:input", "h.1.attn")
    resid_mid = resid_pre + attn_out
    mlp = site_module(model, resolve_site(model, "h.1.mlp"))
    with splice(mlp, lambda h: h + 1, "input"), splice(mlp, lambda h: 2 * h, "output"):
        spliced, = read(model, 1)
    torch.testing.assert_close(spliced, resid_mid + 2 * block.mlp(layer_norm(resid_mid, block.ln_2) + 1),
                               rtol=1e-5, atol=1e-5)


def test_input_of_a_module_called_with_keywords_is_refused_when_it_runs(minilm):
    """The pre-hook backstop: a module whose forward gets no activation by position."""
    model, _ = minilm
    ids, mask = batch()
    with pytest.raises(ConfigError, match="gets no activation by position"):
        HookedLM(model, Site("embeddings", "input"))._hidden_states(ids, mask)


def test_a_sweep_over_sites_of_two_widths_equals_its_members_alone(tiny_gpt2_dir, tmp_path):
    """A glob over the attention blocks and the MLP's hidden layer (d = 256): one LM pass, each member's SAE equal
    to its run alone, bit for bit."""
    run = small_run(tmp_path, steps=3, checkpoint_every=3)
    run.data.source, run.data.dataset, run.data.ctx_len, run.data.shuffle_buffer = "lm", "pydoc-topics", 32, 512
    run.model.name, run.model.path = "tiny", str(tiny_gpt2_dir)
    run.sweep = [{"model": {"hookpoint": "h.[01].attn"}}, {"model.hookpoint": "h.1.mlp.c_fc", "sae.num_latents": 512}]
    validate(run)
    results = train_from_config(run, eval_batches=1)
    assert [r["trainer"].run.model.hookpoint for r in results] == ["h.0.attn:output", "h.1.attn:output", "h.1.mlp.c_fc"]
    assert results[0]["trainer"].source.stream.source.d_model == 64 + 64 + 256  # one pass reads the three sites
    for result in results:
        member = result["trainer"].run
        single = replace(member, trainer=replace(member.trainer, out_dir=str(tmp_path / "alone" / member.name)))
        by_itself = train_from_config(single, eval_batches=1)["trainer"]
        for name, tensor in by_itself.model.state_dict().items():
            torch.testing.assert_close(result["trainer"].model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_compile_leaves_alone_the_blocks_that_hold_a_site(tiny_gpt2_dir):
    """model.compile with a site inside block 1: block 0 is compiled, block 1 (its hook inside) and block 2 (never
    run) are not; a block's own input or output is outside its forward, so that block is compiled."""
    model, _ = load_lm(ModelConfig(name="unused", path=str(tiny_gpt2_dir)))  # compiled in place: a model of its own
    HookedLM(model, ["h.1.mlp", "h.0:input"], compile_blocks=True)
    assert [hasattr(b.forward, "_torchdynamo_orig_callable") for b in model.h] == [True, False, False]
    fresh, _ = load_lm(ModelConfig(name="unused", path=str(tiny_gpt2_dir)))
    HookedLM(fresh, "resid_pre.1", compile_blocks=True)
    assert [hasattr(b.forward, "_torchdynamo_orig_callable") for b in fresh.h] == [True, True, False]
